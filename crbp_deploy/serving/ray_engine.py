"""Ray Serve as the scale-out engine: start a real local Ray cluster on 127.0.0.1, deploy the
application of `ray_app` on it, stop it; write the config files that take the same application to a
multi-node Ray cluster (`serve deploy`) or KubeRay (a RayService).

Why it is built this way:
- the same `.mar` archives as TorchServe (model, card, model-config.yaml with batchSize,
  maxBatchDelay and the handler's limits) and the same `PanopticService`, so both engines answer alike;
- everything in a run folder (`~/.cache/crbp-deploy/ray-P` or --run-dir): Ray's temp dir, the
  unpacked archives, the key file, the generated configs, a state file; `stop` ends exactly the
  processes of this cluster (those under its temp dir and their children), never other Ray clusters
  on the machine (`ray stop` would end every Ray process of the user);
- ports: P (HTTP), P+1 (GCS), P+2, P+3 (node manager, object manager), P+5..P+8 (dashboard agent,
  runtime env agent, metrics), so two clusters on different P do not collide; P+4 stays reserved (it
  was Ray's client server, which is not started). Ray's worker processes take ports from 10002..19999,
  and Ray refuses to start when a component port lies in that range ("...the same port is not used by
  multiple components"): where P..P+8 falls inside it, the worker range is narrowed to the larger side
  of the block (`worker_ports`), so any P in 1024..65526 works.

Locked down (issue 21; measured on Ray 2.60 with `ss -ltnp`):
- `ray start --node-ip-address=127.0.0.1` alone is not enough: Ray replaces a loopback node address by
  the machine's network address (`services.resolve_ip_for_localhost`), and then GCS, raylet, workers and
  the dashboard agent listened on `*`, the runtime-env agent and the client server on the network address.
  With `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` (Ray's switch for single-machine clusters) the node address
  stays 127.0.0.1 in every process, and every Ray component binds it.
- Ray's client server runs any code sent to it (`ray.init("ray://...")`) and `ray start --head` always
  starts one (port 10001 unless told otherwise; a port of 0 is refused). `RAY_START_HOOK` (Ray's hook
  called with the parsed parameters before anything starts) clears its port, so it is never started.
  It also was the process `stop` missed: it names neither the temp dir nor a parent in the cluster.
- Ray's token authentication (`RAY_AUTH_MODE=token`, token in a mode-600 file named by
  `RAY_AUTH_TOKEN_PATH`) guards GCS, raylet, workers and the agents' HTTP endpoints: a process without
  the token cannot join the cluster even on loopback.
- no autoscaler monitor (`--no-monitor`; a fixed local cluster has nothing to scale), no dashboard UI;
- every process carries `CRBP_DEPLOY_RUN=<run folder>` and starts with umask 077; the run folder is mode
  700 (Ray makes its own temp dir 777, so that dir sits inside a 700 folder).
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..config import StrictConfig
from ..errors import ConfigError, CrbpError
from .engine import (KEY_FILE, Engine, Running, end_processes, http_get, marked_processes, port_free, private_dir,
                     private_log, store_models, with_children, write_private)

STATE_FILE = "ray-state.json"
TOKEN_FILE = "ray_token"  # Ray's cluster token (RAY_AUTH_TOKEN_PATH), mode 600
SERVE_CONFIG = "serve_config.yaml"
RAYSERVICE = "rayservice.yaml"
NETWORK_POLICY = "networkpolicy.yaml"
POD_LABEL = {"app.kubernetes.io/name": "crbp-panoptic"}  # on every Ray pod of the RayService; the policy selects it
SERVE_PORT = 8000  # the only port of the cluster meant for clients (through an ingress)
#: Ports of a Ray cluster that must never be reachable from outside it: each one runs code or reads data.
NEVER_EXPOSE = {6379: "GCS", 8265: "dashboard (job submission runs code)", 10001: "Ray client server (runs code)",
                52365: "dashboard agent", 8080: "metrics export", 44217: "autoscaler metrics",
                44227: "dashboard metrics"}
APP_NAME = "crbp"
IMPORT_PATH = "crbp_deploy.serving.ray_app:build_app"
PORT_NAMES = ("http", "gcs", "node_manager", "object_manager", "client_server", "dashboard_agent_listen",
              "dashboard_agent_grpc", "runtime_env_agent", "metrics_export")
UNUSED_PORTS = ("client_server",)  # P+4: reserved, so the other ports keep their places; nothing listens there
CLIENT_SERVER = "ray.util.client.server"  # the module Ray's client server runs as
WORKER_PORTS = (10002, 19999)  # Ray's default --min-worker-port / --max-worker-port


@dataclass(frozen=True)
class RayConfig(StrictConfig):
    """A local Ray Serve deployment; the autoscaling settings go only into the generated cluster config."""

    port: int = 8000
    host: str = "127.0.0.1"
    replicas: int = 1
    threads: int = 1  # CPUs per replica (runtime threads come from the archive's handler config)
    auth: bool = True
    max_ongoing_requests: int = 32
    max_replicas: int = 0  # autoscaling ceiling in the generated config (0: 4 x replicas)
    startup_timeout_s: float = 300.0

    def validate(self) -> None:
        if self.replicas < 1:
            raise ConfigError(f"--replicas must be at least 1, got {self.replicas}")
        if not 1024 <= self.port <= 65535 - len(PORT_NAMES):
            raise ConfigError(f"port must be in 1024..{65535 - len(PORT_NAMES)} (P..P+{len(PORT_NAMES) - 1} are used)")
        if self.threads < 1 or self.max_ongoing_requests < 1 or self.startup_timeout_s <= 0:
            raise ConfigError("threads, max_ongoing_requests and startup_timeout_s must be positive")

    def ports(self) -> dict[str, int]:
        """The ports the cluster listens on (P+4 is reserved and unused)."""
        return {name: self.port + i for i, name in enumerate(PORT_NAMES) if name not in UNUSED_PORTS}


def worker_ports(config: RayConfig) -> tuple[int, int]:
    """Ray's worker port range, kept clear of the cluster's own ports P..P+8: the default range, or the
    larger part of it below or above that block."""
    lo, hi = WORKER_PORTS
    first, last = config.port, config.port + len(PORT_NAMES) - 1
    if last < lo or first > hi:
        return lo, hi
    below, above = (lo, first - 1), (last + 1, hi)
    return max(below, above, key=lambda r: r[1] - r[0])


def check_ports(config: RayConfig, free) -> None:
    """One line naming the first port of P..P+8 that is taken, and a --port whose whole block is free."""
    busy = [(name, p) for name, p in config.ports().items() if not free(config.host, p)]
    if not busy:
        return
    name, port = busy[0]
    width = len(PORT_NAMES)
    alternative = next((p for p in range(config.port + width, 65535 - width, width)
                        if all(free(config.host, q) for q in range(p, p + width))), None)
    hint = f"try --port {alternative}" if alternative else "choose another --port"
    raise CrbpError(f"port(s) in use on {config.host}: {name} {port} (P+{port - config.port}); the Ray engine needs "
                    f"P..P+{width - 1} free: {hint}")


def temp_dir(run: Path) -> Path:
    """Ray's temp dir for this run folder: inside it, unless that path is too long for the Unix sockets
    Ray puts 60 characters below it (107 at most); then a short folder in the system temp dir, named
    after the run folder so `stop` finds the same one. Ray makes this dir mode 777; its parent (the run
    folder, or the short folder) is mode 700, so nobody else can enter it."""
    run = Path(run).resolve()
    inside = run / "ray"
    if len(str(inside)) <= 45:
        return inside
    return Path(tempfile.gettempdir()) / f"crbp-ray-{hashlib.sha1(str(run).encode()).hexdigest()[:10]}" / "ray"


def autoscaling_config(config: RayConfig, batch_size: int) -> dict[str, Any]:
    """Ray Serve autoscaling: a replica is busy at about one batch in flight."""
    return {
        "min_replicas": 1,
        "initial_replicas": config.replicas,
        "max_replicas": config.max_replicas or 4 * config.replicas,
        "target_ongoing_requests": batch_size,
        "upscale_delay_s": 10,
        "downscale_delay_s": 120,
    }


def network_policy() -> dict[str, Any]:
    """A Kubernetes NetworkPolicy for the RayService's pods: from outside the cluster's own pods only Serve's
    HTTP port, and the dashboard for the KubeRay operator (it deploys and watches the Serve application
    through it); GCS, raylets, workers, the client server and the agents only between the cluster's pods."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "crbp-panoptic-ray"},
        "spec": {
            "podSelector": {"matchLabels": dict(POD_LABEL)},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [{"podSelector": {"matchLabels": dict(POD_LABEL)}}]},  # Ray's own traffic, pod to pod
                {"ports": [{"protocol": "TCP", "port": SERVE_PORT}]},  # clients (put auth at the ingress)
                {"from": [{"namespaceSelector": {},
                           "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}}],
                 "ports": [{"protocol": "TCP", "port": 8265}]},
            ],
        },
    }


def cluster_configs(config: RayConfig, model_store: str, batch_size: int = 8) -> dict[str, str]:
    """{file name: YAML}: a Ray Serve config for `serve deploy` on any Ray cluster, a KubeRay RayService
    embedding it (Ray token auth on, through KubeRay's `authOptions`), and a NetworkPolicy that keeps Ray's
    own ports inside the cluster. `model_store` must be readable at that path on every node (shared volume
    or image)."""
    import yaml

    serve_config = {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": 8000},
        "applications": [{
            "name": APP_NAME,
            "route_prefix": "/",
            "import_path": IMPORT_PATH,
            "args": {"model_store": model_store, "threads": config.threads,
                     "max_ongoing_requests": config.max_ongoing_requests,
                     "autoscaling_config": autoscaling_config(config, batch_size)},
        }],
    }
    import ray

    image = f"rayproject/ray:{ray.__version__}-py{sys.version_info.major}{sys.version_info.minor}-cpu"
    container = {"name": "ray", "image": image,
                 "resources": {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"cpu": "2", "memory": "4Gi"}},
                 # the body limit in Serve's proxy (there it imports crbp_deploy, torch included: ~180 MB per proxy)
                 "env": [{"name": "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "value": f"{__name__}.proxy_middlewares"}]}
    rayservice = {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": "crbp-panoptic"},
        "spec": {
            "serveConfigV2": yaml.safe_dump(serve_config, sort_keys=False),
            "rayClusterConfig": {
                "rayVersion": ray.__version__,
                "authOptions": {"mode": "token"},  # KubeRay >= 1.5.1: a generated Secret, RAY_AUTH_* on every pod
                "headGroupSpec": {"rayStartParams": {"num-cpus": "0"},  # the head runs the proxy, not replicas
                                  "template": {"metadata": {"labels": dict(POD_LABEL)},
                                               "spec": {"containers": [container]}}},
                "workerGroupSpecs": [{
                    "groupName": "cpu", "replicas": 1, "minReplicas": 1,
                    "maxReplicas": autoscaling_config(config, batch_size)["max_replicas"],
                    "rayStartParams": {}, "template": {"metadata": {"labels": dict(POD_LABEL)},
                                                       "spec": {"containers": [container]}},
                }],
                "enableInTreeAutoscaling": True,
            },
        },
    }
    return {SERVE_CONFIG: yaml.safe_dump(serve_config, sort_keys=False),
            RAYSERVICE: yaml.safe_dump(rayservice, sort_keys=False),
            NETWORK_POLICY: yaml.safe_dump(network_policy(), sort_keys=False)}


def _cluster_processes(run: Path) -> list:
    """This cluster's processes: those carrying the run folder in their environment (everything `ray start`
    spawned, a daemon reparented to pid 1 included), those naming its temp dir (GCS, raylet, agents), and
    all their children."""
    import psutil

    marker = f"{temp_dir(run)}{os.sep}"  # its session folders, not a sibling that shares the prefix
    roots = marked_processes(run)
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in arg for arg in proc.info["cmdline"] or []):
                roots.append(proc)
        except psutil.Error:
            continue
    return with_children(roots)


def _name(proc) -> str:
    try:
        return proc.name()
    except Exception:  # noqa: BLE001 - gone or not ours: not GCS
        return ""


def ray_environment(run: Path, config: RayConfig) -> dict[str, str]:
    """The environment of `ray start` and the deploying driver (every Ray process inherits it): node address
    kept on loopback, no client server, Ray's token auth with this run's token, the body limit in Serve's
    proxy (the hooks module in the run folder on the PYTHONPATH); umask 077 is set by the caller."""
    hooks = run / "hooks"
    path = os.pathsep.join(p for p in (str(hooks), os.environ.get("PYTHONPATH", "")) if p)
    env = {"RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": str(config.threads),
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # node IP stays 127.0.0.1 (Ray's single-machine mode)
           "RAY_START_HOOK": f"{HOOKS_MODULE}.ray_start_hook",
           "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": f"{HOOKS_MODULE}.proxy_middlewares",
           MAX_BODY_ENV: str(MAX_REQUEST_BYTES), "PYTHONPATH": path,
           # Serve's controller kills an HTTP proxy not ready in 5 s; on 2 busy cores its start takes longer
           "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(run / TOKEN_FILE)}
    env = RayServe().environment(run, env)
    env.pop("RAY_AUTH_TOKEN", None)  # would take precedence over the token file
    env.pop("RAY_ADDRESS", None)  # the driver connects to this cluster only
    return env


# --- code that runs inside Ray's own processes ---------------------------------------------------------
# `ray start` (RAY_START_HOOK) and Serve's HTTP proxy (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH) import these
# by module path. Importing anything under crbp_deploy.serving loads torch (the package imports the service),
# which would add 181 MB to the proxy (measured), so `start` writes these definitions, which need only the
# standard library and Starlette, to a module of their own in the run folder (`hooks/crbp_ray_hooks.py`, on
# the cluster's PYTHONPATH); `hooks_source()` builds it from the code below.

HOOKS_MODULE = "crbp_ray_hooks"
MAX_BODY_ENV = "CRBP_RAY_MAX_REQUEST_BYTES"
MAX_REQUEST_BYTES = 21 * 1024 * 1024  # as TorchServe's max_request_size: the 20 MiB image plus multipart overhead


def ray_start_hook(params, head):
    """`RAY_START_HOOK` of `ray start` (called with the parsed RayParams before anything starts): no Ray
    client server. `ray start --head` sets its port to 10001 when none is given and refuses 0, and the
    head starts it whenever a port is set."""
    params.ray_client_server_port = None


class BodyLimit:
    """ASGI middleware in Serve's HTTP proxy: a body over `max_bytes` is answered 413 while it streams.

    Serve's proxy pumps every body message into an unbounded queue as fast as the socket delivers (and the
    replica pulls them into another), so a limit applied in the replica comes after the proxy has read far
    more (measured: a 200 MB chunked upload, refused by the replica at 21 MiB, had been read to 81 MB, and
    the proxy grew by 100 MB). Here a declared Content-Length over the limit is refused before any byte is
    read; a body without one (chunked) is read here up to the limit, refused as soon as it passes it, and
    otherwise handed on whole, as TorchServe's front end aggregates a request before its handler sees it.
    """

    def __init__(self, app, max_bytes):
        self.app, self.max_bytes = app, int(max_bytes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length", b"").strip()
        if length.isdigit():  # the HTTP parser delivers at most this many bytes
            if int(length) > self.max_bytes:
                return await self.refuse(send, f"request of {int(length)} bytes exceeds {self.max_bytes}")
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before the body was complete: nobody to answer
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                chunks.clear()
                return await self.refuse(send, f"request body passed {self.max_bytes} bytes ({size} received); "
                                               "refused before reading the rest")
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        chunks.clear()
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)

    async def refuse(self, send, message):
        """413 in TorchServe's error shape; the connection is closed, so the rest of the body is never read."""
        body = json.dumps({"code": 413, "type": "RequestEntityTooLarge", "message": message}, indent=2).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def proxy_middlewares():
    """RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH of Serve's proxy: the middlewares it applies to every request."""
    from starlette.middleware import Middleware

    return [Middleware(BodyLimit, max_bytes=int(os.environ.get(MAX_BODY_ENV) or MAX_REQUEST_BYTES))]


def hooks_source() -> str:
    """The module `start` writes to the run folder: the definitions above, without importing crbp_deploy."""
    import inspect

    head = ['"""Generated by `crbp-deploy serve --engine ray` from crbp_deploy/serving/ray_engine.py: imported by '
            '`ray start` and Serve\'s HTTP proxy."""', "import json\nimport os",
            f"MAX_BODY_ENV = {MAX_BODY_ENV!r}\nMAX_REQUEST_BYTES = {MAX_REQUEST_BYTES}"]
    return "\n\n\n".join(head + [inspect.getsource(obj) for obj in (ray_start_hook, BodyLimit, proxy_middlewares)])


@dataclass
class RayServer(Running):
    """A local Ray Serve cluster started by `RayServe.start`; `files` are the generated cluster configs."""

    engine: ClassVar[str] = "ray"
    title: ClassVar[str] = "Ray Serve"
    files: dict[str, Path] = field(default_factory=dict)

    def status(self) -> str:
        return f"{self.config.replicas} replica(s)"

    def links(self) -> list[str]:
        return [f"  cluster configs: {', '.join(str(p) for p in self.files.values())} (serve deploy / KubeRay)"]


def _ray_start(run: Path, config: RayConfig, env: dict, say) -> None:
    """`ray start --head` with every port pinned to P+1..P+8 on 127.0.0.1 and Ray's temp dir in the run folder;
    fails if a client server started anyway."""
    ports = config.ports()
    low, high = worker_ports(config)
    cpus = max(os.cpu_count() or 1, config.replicas * config.threads)
    say(f"starting a local Ray cluster on {config.host} (run folder {run})")
    args = [
        str(Path(sys.executable).with_name("ray")), "start", "--head", f"--node-ip-address={config.host}",
        f"--port={ports['gcs']}", f"--node-manager-port={ports['node_manager']}",
        f"--object-manager-port={ports['object_manager']}",
        f"--dashboard-agent-listen-port={ports['dashboard_agent_listen']}",
        f"--dashboard-agent-grpc-port={ports['dashboard_agent_grpc']}",
        f"--runtime-env-agent-port={ports['runtime_env_agent']}", f"--metrics-export-port={ports['metrics_export']}",
        "--include-dashboard=false", "--no-monitor", "--disable-usage-stats", f"--temp-dir={temp_dir(run)}",
        f"--num-cpus={cpus}", "--object-store-memory=100000000", f"--min-worker-port={low}",
        f"--max-worker-port={high}",
    ]
    with private_log(run / "ray-start.log") as log:
        done = subprocess.run(args, cwd=run, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=180, umask=0o077)
    if done.returncode != 0:
        tail = (run / "ray-start.log").read_text(errors="replace").strip().splitlines()[-5:]
        raise CrbpError(f"ray start failed (exit {done.returncode}): {' / '.join(tail)}")
    for proc in _cluster_processes(run):
        try:
            if any(CLIENT_SERVER in arg for arg in proc.cmdline()):
                raise CrbpError(f"Ray started its client server (pid {proc.pid}) although it was turned off; "
                                f"not serving with it (see {run / 'ray-start.log'})")
        except OSError:
            continue


def _answers(url: str, token: str | None) -> bool:
    try:
        return http_get(url, token)[0] == 200
    except OSError:
        return False


def _batch_size(unpacked: Path) -> int:
    import yaml

    sizes = [int((yaml.safe_load(p.read_text()) or {}).get("batchSize", 1)) for p in unpacked.glob("*/model-config.yaml")]
    return max(sizes, default=8)


DEPLOY = """
import json, sys
import ray
from ray import serve
from crbp_deploy.serving.ray_app import build_app
spec = json.loads(sys.argv[1])
ray.init(address=spec["address"], namespace="crbp-deploy", log_to_driver=False, logging_level="ERROR")
serve.start(http_options={"host": spec["host"], "port": spec["port"]}, proxy_location="HeadOnly")
serve.run(build_app(spec["args"]), name=spec["app"], route_prefix="/")
"""


def _deploy(run: Path, store: Path, config: RayConfig, env: dict, say) -> None:
    """Deploy in a short-lived driver process: Serve's controller is detached, the app outlives it."""
    say(f"deploying {config.replicas} replica(s) with Ray Serve")
    spec = {
        "address": f"{config.host}:{config.ports()['gcs']}", "host": config.host, "port": config.port, "app": APP_NAME,
        "args": {"model_store": str(store), "unpack_dir": str(run / "models"), "num_replicas": config.replicas,
                 "threads": config.threads, "max_ongoing_requests": config.max_ongoing_requests,
                 "key_file": str(run / KEY_FILE) if config.auth else None},
    }
    with private_log(run / "ray-deploy.log") as log:
        try:
            done = subprocess.run([sys.executable, "-c", DEPLOY, json.dumps(spec)], cwd=run, env=env, stdout=log,
                                  stderr=subprocess.STDOUT, timeout=config.startup_timeout_s, umask=0o077)
        except subprocess.TimeoutExpired:
            raise CrbpError(f"deploying on Ray took longer than {config.startup_timeout_s:.0f} s; see {run / 'ray-deploy.log'}") from None
    if done.returncode != 0:
        lines = [ln for ln in (run / "ray-deploy.log").read_text(errors="replace").splitlines() if ln.strip()]
        errors = [ln for ln in lines if "Error" in ln or "Exception" in ln]
        raise CrbpError(f"deploying on Ray failed: {(errors or lines or ['no output'])[-1].strip()} (log: {run / 'ray-deploy.log'})")


class RayServe(Engine):
    """Ray Serve on a local Ray cluster: replicas on one machine, and the configs for a multi-node cluster."""

    name = "ray"
    noun = "Ray cluster"
    stopped = "stopped the Ray cluster; its processes have exited"
    gone = "the Ray cluster exited; see {logs}"
    requires = (("ray.serve", "ray[serve]"),)
    install = "the Ray engine needs Ray Serve: pip install 'crbp-deploy[ray]'"

    def configure(self, port: int, auth: bool = True, replicas: int | None = None) -> RayConfig:
        return RayConfig(port=port, replicas=1 if replicas is None else replicas, auth=auth)

    def running(self, run_dir) -> int | None:
        """The lowest pid of the cluster's processes while its state file is there, else None."""
        run = Path(run_dir)
        procs = _cluster_processes(run) if (run / STATE_FILE).is_file() else []
        return min(p.pid for p in procs) if procs else None

    def log_dir(self, run_dir) -> Path:
        return temp_dir(run_dir)

    def processes(self, run_dir) -> list:
        return _cluster_processes(Path(run_dir))

    def start(self, model_store, config: RayConfig | None = None, *, run_dir=None, models=None, progress=None) -> RayServer:
        """Start a local Ray cluster on 127.0.0.1, deploy every archive of `model_store` with `config.replicas`
        replicas, wait until /ping answers. On failure the cluster is stopped and the error names the log folder."""
        config = config or RayConfig()
        say = progress or (lambda msg: None)
        try:
            store, served, run = self.prepare(model_store, config, run_dir, models)
        except CrbpError as exc:
            if str(exc).startswith("port(s) in use"):
                check_ports(config, port_free)  # the same refusal, naming a --port whose whole block is free
            raise
        if set(served) != set(store_models(store)):  # ray_app deploys the whole store
            raise CrbpError("the Ray engine serves every archive in the model store; give it a store with only those")
        for path in (temp_dir(run), run / "models", run / KEY_FILE, run / STATE_FILE):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        private_dir(temp_dir(run).parent)
        token = None
        if config.auth:  # TorchServe's key file layout, so `predict --url` and the tests read it the same way
            token = secrets.token_urlsafe(12)
            write_private(run / KEY_FILE, json.dumps({"inference": {"key": token}}))
        write_private(run / TOKEN_FILE, secrets.token_hex(32))  # Ray's own cluster token, with or without --no-auth
        private_dir(run / "hooks")
        write_private(run / "hooks" / f"{HOOKS_MODULE}.py", hooks_source())
        env = ray_environment(run, config)
        try:
            _ray_start(run, config, env, say)
            write_private(run / STATE_FILE, json.dumps({"engine": "ray", "port": config.port, "gcs": config.ports()["gcs"],
                                                      "models": served, "replicas": config.replicas}))
            _deploy(run, store, config, env, say)
            deadline = time.monotonic() + config.startup_timeout_s
            while not _answers(f"http://{config.host}:{config.port}/ping", token):
                if time.monotonic() > deadline:
                    raise CrbpError(f"Ray Serve did not answer /ping within {config.startup_timeout_s:.0f} s; "
                                    f"logs in {self.log_dir(run)}")
                time.sleep(0.5)
        except BaseException:
            self.stop(run)
            raise
        files = {}
        for name, text in cluster_configs(config, str(store), _batch_size(run / "models")).items():
            write_private(run / name, text)
            files[name] = run / name
        return RayServer(run, config, served, {"inference": token} if token else {}, files)

    def stop(self, run_dir, timeout: float | None = None) -> bool:
        """End this cluster's processes (SIGTERM, then SIGKILL after `timeout`, default 15 s) and wait until
        none is left; False if none was running (a state file left by a dead cluster counts as running: it
        is cleaned up)."""
        run = Path(run_dir)
        procs = _cluster_processes(run)
        ended = bool(procs)
        for _ in range(3):  # a raylet that is shutting down can still spawn a worker: sweep again
            if not procs:
                break
            # GCS last: with GCS up, the raylet and workers exit within 0.1 s of SIGTERM and GCS then in
            # about 2 s; terminated together, the raylet waited 10 s for GCS and GCS outlived 20 s (measured)
            gcs = [p for p in procs if _name(p) == "gcs_server"]
            end_processes([p for p in procs if p not in gcs], 15.0 if timeout is None else timeout)
            end_processes(gcs, 15.0 if timeout is None else timeout)
            procs = _cluster_processes(run)
        if procs:
            raise CrbpError(f"processes of the Ray cluster in {run} survived SIGKILL: {sorted(p.pid for p in procs)}")
        had_state = (run / STATE_FILE).exists()
        for name in (STATE_FILE, KEY_FILE, TOKEN_FILE):
            (run / name).unlink(missing_ok=True)
        return ended or had_state
