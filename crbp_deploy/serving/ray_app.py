"""The Ray Serve application: HTTP in, `PanopticService` in the replicas, the TorchServe API out.

This module imports Ray; `ray_engine` starts a local cluster and deploys `build_app`, and the config
files it writes name `crbp_deploy.serving.ray_app:build_app`, so a multi-node cluster or KubeRay
builds the same application. The request logic is the engine-independent `service`; this file only
maps HTTP to `RawRequest` and `Reply` back, with TorchServe's routes, headers and error shapes, so a
client cannot tell the two engines apart:

- `POST /predictions/NAME` (raw body + X-Max-Iters / X-Tol, or multipart field `data` + fields),
  `POST /invocations?model_name=NAME&max_iters=..&tol=..`, `GET /ping`; the query string of
  /predictions is ignored, as TorchServe 0.12 does;
- token auth with the key file's inference key (TorchServe's 400 `InvalidKeyException` otherwise),
  TorchServe's 404 `ModelNotFoundException` for an unknown model (`ModelVersionNotFoundException` for
  /predictions/NAME/VERSION of another version), 400 for more than 8 KiB of headers or a request line
  over 4 KiB (Netty's limits in TorchServe), a repeated header read as its last value (as TorchServe
  hands headers to its handler), /invocations without model_name served by the only model;
- the body is read as it streams, with a limit: a body over `max_request_bytes` (declared by
  Content-Length or sent chunked) is answered 413 as soon as the limit is passed, before the rest is read
  (TorchServe answers 413 to a declared size and resets a chunked upload at its limit);
- where TorchServe's own front end answers differently, this file does the HTTP-correct thing and
  docs/deploy.md lists the difference (methods other than POST: 405 here; a malformed multipart body:
  400 here).

Scheduling: each replica runs every model under the iteration-level `Scheduler` (scheduled.py): the
deployment is async, a request is parsed off the event loop, joins the scheduler's slots between two
solver steps and leaves as soon as its halting fires, while the scheduler's background thread ticks.
`scheduler: {"mode": "request"}` in the args gives request-level batching through the same path (for
comparison), `scheduler: null` the whole-request batching of TorchServe: `serve.batch` collects up to
the archive's `batchSize` requests within `maxBatchDelay` ms and `PanopticService.handle` groups them by
budget and size. An artifact no stepper can run step by step (logged at start) is served that way too.
"""
from __future__ import annotations

import asyncio
import email.parser
import email.policy
import hmac
import json
import logging
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ray import serve
from starlette.requests import Request
from starlette.responses import Response

from ..errors import CrbpError
from .scheduled import ScheduledService, SchedulerConfig
from .service import PanopticService, RawRequest, Reply, ServiceConfig, error_reply

log = logging.getLogger(__name__)
INVALID_KEY = "Token Authorization failed. Token either incorrect, expired, or not provided correctly"
#: TorchServe's (Netty's) header limit: above it TorchServe answers 400 before anything else; Ray's
#: proxy accepts 64 KiB of headers (measured), so the replica applies the same limit.
MAX_HEADER_BYTES = 8192
#: Netty's request line limit in TorchServe (method, URL and version): longer lines get 400 there.
MAX_LINE_BYTES = 4096
NOT_FOUND = "Requested resource is not found, please refer to API document."
NOT_ALLOWED = "Requested method is not allowed, please refer to API document."


class BodyTooLarge(Exception):
    """The body passed the size limit while it streamed."""


def _replica_grpc_on_loopback() -> None:
    """Ray Serve 2.60 binds every replica's inter-deployment gRPC server to "[::]:0" (all interfaces),
    whatever the node address (measured: `*:35541` beside a cluster otherwise on 127.0.0.1). On the local
    cluster `serve --engine ray` starts (node address kept on loopback, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0)
    it is bound to 127.0.0.1 instead, where the other processes of the node reach it. This module is imported
    in each replica before Serve starts that server, and Serve's replica module calls the function by the
    name it imported, so that name is wrapped. On any other cluster nothing changes."""
    if os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") != "0":
        return
    try:
        from ray.serve._private import replica
    except ImportError:
        return
    original = getattr(replica, "add_port_to_grpc_server", None)
    if original is None or getattr(original, "loopback_only", False):
        return

    def on_loopback(server, address):
        if isinstance(address, str) and address.startswith("[::]:"):
            address = "127.0.0.1:" + address.rsplit(":", 1)[1]
        return original(server, address)

    on_loopback.loopback_only = True
    replica.add_port_to_grpc_server = on_loopback


_replica_grpc_on_loopback()


def _ts_error(code: int, kind: str, message: str) -> Response:
    """An error in TorchServe's own shape ({"code", "type", "message"}), for what TorchServe answers itself.
    A 413 closes the connection: the rest of the body is never read."""
    return Response(json.dumps({"code": code, "type": kind, "message": message}, indent=2), code,
                    media_type="application/json", headers={"Connection": "close"} if code == 413 else None)


def unpack_archive(mar: Path, dest: Path) -> dict[str, Any]:
    """Unpack a .mar (the same archive TorchServe serves) -> {name, model_file, batch_size, batch_delay_ms,
    service}: the Ray engine reads the archive's model-config.yaml like TorchServe does."""
    import yaml

    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(mar) as archive:
        names = [n for n in archive.namelist() if not n.startswith("crbp_deploy/")]  # the installed package runs
        archive.extractall(dest, members=names)
    manifest = json.loads((dest / "MAR-INF" / "MANIFEST.json").read_text())
    config = yaml.safe_load((dest / "model-config.yaml").read_text()) if (dest / "model-config.yaml").is_file() else {}
    return {
        "name": manifest["model"]["modelName"],
        "version": str(manifest["model"].get("modelVersion") or ""),
        "model_file": str(dest / manifest["model"]["serializedFile"]),
        "batch_size": int(config.get("batchSize", 1)),
        "batch_delay_ms": int(config.get("maxBatchDelay", 100)),
        "service": config.get("handler") or {},
    }


def parse_multipart(content_type: str, body: bytes) -> tuple[dict, dict]:
    """multipart/form-data -> (fields, content type per field), as TorchServe hands them to a handler."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode("latin-1") + body)
    if not message.is_multipart():
        raise ValueError("not a multipart body")
    fields, types = {}, {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            continue
        fields[name] = part.get_payload(decode=True) or b""
        types[name] = part.get_content_type() if part.get("content-type") else ""
    return fields, types


def last_headers(request: Request) -> dict[str, str]:
    """The request's headers, lower-cased; a repeated header keeps its last value, as TorchServe's front end
    hands headers to its handler (one map entry per name)."""
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in request.headers.raw}


async def read_body(request: Request, limit: int) -> bytes:
    """The body, read as it streams; raises BodyTooLarge as soon as more than `limit` bytes arrived, so an
    oversized upload (chunked or not) is never held whole."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(size)
        chunks.append(chunk)
    return b"".join(chunks)


async def to_raw_request(request: Request, query_fields: bool, limit: int = 21 * 1024 * 1024) -> RawRequest:
    """HTTP -> RawRequest; query parameters become fields only where TorchServe passes them (/invocations)."""
    headers = last_headers(request)
    body = await read_body(request, limit)
    ctype = headers.get("content-type", "")
    fields: dict[str, Any] = dict(request.query_params) if query_fields else {}
    if ctype.split(";")[0].strip().lower() == "multipart/form-data":
        try:
            parts, types = parse_multipart(ctype, body)
        except Exception as exc:  # noqa: BLE001 - a malformed body is the client's problem
            return RawRequest({}, {}, headers, error=f"malformed multipart body: {exc}")
        return RawRequest({**fields, **parts}, types, headers)
    fields["body"] = body
    return RawRequest(fields, {"body": ctype}, headers)


class PanopticIngress:
    """One replica: every model of the store loaded once, requests batched per replica."""

    def __init__(self, models: list[dict], key: str | None = None, max_request_bytes: int = 21 * 1024 * 1024,
                 scheduler: dict | None = None):
        import torch

        threads = max(int(m["service"].get("threads", 1)) for m in models)
        torch.set_num_threads(threads)  # post-processing runs in torch; a replica owns its CPUs
        self.services = {
            m["name"]: PanopticService(m["model_file"], ServiceConfig.from_dict(m["service"]), name=m["name"])
            for m in models
        }
        self.scheduled = _scheduled(self.services, scheduler)
        self.parse_pool = ThreadPoolExecutor(1)  # image decoding off the event loop
        self.versions = {m["name"]: m.get("version", "") for m in models}
        self.key = key
        self.max_request_bytes = max_request_bytes
        self.pool = ThreadPoolExecutor(1)  # one model call at a time per replica: replicas scale, not threads
        self.predict.set_max_batch_size(max(m["batch_size"] for m in models))
        self.predict.set_batch_wait_timeout_s(max(m["batch_delay_ms"] for m in models) / 1000.0)

    def _handle(self, items: list[tuple[str, RawRequest]]) -> list[Reply]:
        """Group a Serve batch by model; each service groups by budget and size. Never raises."""
        replies: list[Reply | None] = [None] * len(items)
        by_model: dict[str, list[int]] = {}
        for i, (name, _) in enumerate(items):
            by_model.setdefault(name, []).append(i)
        for name, members in by_model.items():
            try:
                answers = self.services[name].handle([items[i][1] for i in members])
            except Exception as exc:  # never lose the batch: every request gets a JSON answer
                log.exception("the batch failed")
                answers = [error_reply(500, f"internal error: {exc}") for _ in members]
            for i, reply in zip(members, answers):
                replies[i] = reply
        return replies  # type: ignore[return-value]

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def predict(self, items: list[tuple[str, RawRequest]]) -> list[Reply]:
        return await asyncio.get_running_loop().run_in_executor(self.pool, self._handle, items)

    def _authorized(self, request: Request) -> bool:
        if not self.key:
            return True
        given = request.headers.get("authorization", "")
        return given.startswith("Bearer ") and hmac.compare_digest(given[7:].strip(), self.key)

    def _route(self, request: Request, parts: list[str]) -> str | Response:
        """The model a POST is for, or TorchServe's answer when there is none (404 / 405 / 400)."""
        if not parts or parts[0] not in ("predictions", "invocations"):
            return _ts_error(404, "ResourceNotFoundException", NOT_FOUND)
        if request.method != "POST":
            return _ts_error(405, "MethodNotAllowedException", NOT_ALLOWED)
        if parts[0] == "invocations":
            if len(parts) > 1:
                return _ts_error(404, "ResourceNotFoundException", NOT_FOUND)
            name = request.query_params.get("model_name")
            if name is None and len(self.services) == 1:  # TorchServe serves its only model
                name = next(iter(self.services))
            if name is None:
                return _ts_error(400, "BadRequestException", "Parameter model_name is required.")
        else:
            if len(parts) not in (2, 3):
                return _ts_error(404, "ResourceNotFoundException", NOT_FOUND)
            name = parts[1]
        if name not in self.services:
            return _ts_error(404, "ModelNotFoundException", f"Model not found: {name}")
        if len(parts) == 3 and parts[2] != self.versions.get(name):
            return _ts_error(404, "ModelVersionNotFoundException", f"Model version: {parts[2]} does not exist for model: {name}")
        return name

    async def __call__(self, request: Request) -> Response:
        parts = [p for p in request.url.path.split("/") if p]
        header_bytes = sum(len(k) + len(v) + 4 for k, v in request.headers.raw)
        if header_bytes > MAX_HEADER_BYTES:
            return _ts_error(400, "BadRequestException", f"headers of {header_bytes} bytes exceed {MAX_HEADER_BYTES}")
        query = request.scope.get("query_string") or b""
        line = len(request.method) + len(request.scope.get("raw_path") or b"") + (len(query) + 1 if query else 0) + 10
        if line > MAX_LINE_BYTES:
            return _ts_error(400, "BadRequestException", f"request line of {line} bytes exceeds {MAX_LINE_BYTES} (URL too long)")
        if not self._authorized(request):
            return _ts_error(400, "InvalidKeyException", INVALID_KEY)
        if parts == ["ping"]:  # any method, as TorchServe answers it
            return Response(json.dumps({"status": "Healthy"}, indent=2), 200, media_type="application/json")
        name = self._route(request, parts)
        if isinstance(name, Response):
            return name
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_request_bytes:
            return _ts_error(413, "RequestEntityTooLarge", f"request of {length} bytes exceeds {self.max_request_bytes}")
        try:
            raw = await to_raw_request(request, parts[0] == "invocations", self.max_request_bytes)
        except BodyTooLarge as exc:
            return _ts_error(413, "RequestEntityTooLarge",
                             f"request body passed {self.max_request_bytes} bytes ({exc.args[0]} received); refused before reading the rest")
        if name in self.scheduled:
            loop = asyncio.get_running_loop()
            pending = await loop.run_in_executor(self.parse_pool, self.scheduled[name].submit, raw)
            reply = await asyncio.wrap_future(pending)
        else:
            reply = await self.predict((name, raw))
        return Response(reply.json(), reply.status, media_type="application/json", headers=reply.headers or None)


def _scheduled(services: dict[str, PanopticService], scheduler: dict | None) -> dict[str, ScheduledService]:
    """A started ScheduledService per model (none with `scheduler=None`); a model whose artifact no stepper
    runs keeps whole-request batching, and the log says so."""
    if scheduler is None:
        return {}
    config = SchedulerConfig.from_dict(scheduler)
    out = {}
    for name, service in services.items():
        try:
            out[name] = ScheduledService(service, config).start()
        except CrbpError as exc:
            log.warning("%s: no iteration-level scheduling (%s); batching whole requests", name, exc)
    return out


def build_app(args: dict[str, Any]):
    """Ray Serve application builder (`import_path: crbp_deploy.serving.ray_app:build_app`).

    args: model_store (folder of .mar), unpack_dir (where to unpack them; default model_store/.ray),
    key_file (TorchServe-style key_file.json; none = no auth), num_replicas or autoscaling_config,
    threads (CPUs per replica), max_ongoing_requests, scheduler (SchedulerConfig keys; default
    iteration-level with 8 slots; null = whole-request batching).
    """
    from .engine import read_keys

    store = Path(args["model_store"])
    unpack = Path(args.get("unpack_dir") or store / ".ray-unpacked")
    models = [unpack_archive(mar, unpack / mar.stem) for mar in sorted(store.glob("*.mar"))]
    if not models:
        raise ValueError(f"no .mar archives in {store}")
    key = read_keys(Path(args["key_file"]).parent).get("inference") if args.get("key_file") else None
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": float(args.get("threads", 1))},
        "max_ongoing_requests": int(args.get("max_ongoing_requests", 32)),
    }
    if args.get("autoscaling_config"):
        options["autoscaling_config"] = args["autoscaling_config"]
    else:
        options["num_replicas"] = int(args.get("num_replicas", 1))
    deployment = serve.deployment(PanopticIngress, name="PanopticIngress").options(**options)
    scheduler = args.get("scheduler", {})  # an absent key: the default scheduler; null: none
    return deployment.bind(models, key, 21 * 1024 * 1024, scheduler)
