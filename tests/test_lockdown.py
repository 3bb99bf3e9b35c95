"""Issue 21: a server `crbp-deploy serve` starts is locked down, on either engine.

- nothing of its process tree listens beyond loopback (checked with `ss -ltnup` and psutil);
- no unauthenticated way to run code: no Ray client server, Ray's token auth on its cluster, TorchServe's
  management API closed (the management and API keys are dropped once the workers are READY);
- stop means stopped: start -> stop twice on the same port, and after each stop no process
  of that run is alive and every port it listened on is free;
- limits before reading: a 200 MB chunked upload is refused while it streams (memory growth measured);
- one HTTP behaviour: every case of the issue gets the same status class from both engines and a message
  naming the problem; where TorchServe's own front end answers before the handler can act, the difference
  is asserted as documented in docs/deploy.md ("Where the engines differ").

The tests without a server come first; the rest start a real TorchServe and a real local Ray cluster on
127.0.0.1 and stop them (module fixtures, `served`).
"""
import ast
import asyncio
import io
import json
import os
import re
import shutil
import socket
import stat
import statistics
import subprocess
import sys
import time
import uuid

import numpy as np
import psutil
import pytest
import yaml
from PIL import Image

from crbp_deploy.errors import InputError
from crbp_deploy.imageio import decode_image
from crbp_deploy.serving.engine import RUN_ENV, get_engine, is_loopback, port_free, read_keys
from serving_util import cli, free_ports, multipart, sample, served, tiny_store

pytestmark = [pytest.mark.serve, pytest.mark.timeout(1500)]
LIMIT = 21 * 1024 * 1024  # both engines' request size limit


def float_tiff(bad: float) -> bytes:
    pixels = np.full((32, 32), 0.5, np.float32)
    pixels[3:5, 3:5] = bad
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="F").save(buf, format="TIFF")
    return buf.getvalue()


# --- without a server --------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_float_image_with_nan_or_inf_is_bad_input(bad):
    with pytest.raises(InputError, match=r"image: 4 pixel\(s\) of this float image are NaN or infinite"):
        decode_image(float_tiff(bad))
    assert decode_image(float_tiff(0.25)).shape == (32, 32, 3)  # a finite float image still decodes


def test_is_loopback():
    for ip in ("127.0.0.1", "127.3.4.5", "::1", "::ffff:127.0.0.1"):
        assert is_loopback(ip), ip
    for ip in ("0.0.0.0", "::", "*", "192.0.2.2", "::ffff:192.0.2.2", "10.0.0.1", ""):
        assert not is_loopback(ip), ip


def test_ray_start_hook_turns_the_client_server_off():
    from crbp_deploy.serving.ray_engine import hooks_source, ray_start_hook

    class Params:
        ray_client_server_port = 10001  # what `ray start --head` sets when no port is given

    params = Params()
    ray_start_hook(params, True)
    assert params.ray_client_server_port is None
    generated = {}
    exec(compile(hooks_source(), "crbp_ray_hooks.py", "exec"), generated)  # the module Ray's processes import
    assert {"ray_start_hook", "BodyLimit", "proxy_middlewares"} <= set(generated)
    imported = {alias.name for node in ast.walk(ast.parse(hooks_source())) if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in node.names} | {node.module for node in ast.walk(ast.parse(hooks_source()))
                                            if isinstance(node, ast.ImportFrom)}
    assert imported <= {"json", "os", "starlette.middleware", "Middleware"}, imported  # no crbp_deploy (torch) in Ray


def _run_middleware(limit, messages, headers=()):
    """Drive BodyLimit (from the generated hooks module) with `messages`: (sent, how many were read, body the
    app got or None)."""
    from crbp_deploy.serving.ray_engine import hooks_source

    hooks = {}
    exec(compile(hooks_source(), "crbp_ray_hooks.py", "exec"), hooks)
    pending, sent, got = list(messages), [], {}

    async def receive():
        return pending.pop(0) if pending else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    async def app(scope, receive, send):
        message = await receive()
        got["body"] = message["body"]
        await send({"type": "http.response.start", "status": 200, "headers": []})

    scope = {"type": "http", "headers": list(headers)}
    asyncio.run(hooks["BodyLimit"](app, limit)(scope, receive, send))
    return sent, len(messages) - len(pending), got.get("body")


def test_body_limit_in_the_proxy_refuses_while_streaming():
    chunk = {"type": "http.request", "body": b"x" * 1000, "more_body": True}
    sent, read, body = _run_middleware(2500, [chunk] * 10 + [{"type": "http.request", "body": b"", "more_body": False}])
    assert sent[0]["status"] == 413 and read == 3 and body is None  # refused at the third chunk, seven never read
    assert (b"connection", b"close") in sent[0]["headers"]
    assert "passed 2500 bytes (3000 received)" in json.loads(sent[1]["body"])["message"]
    sent, read, body = _run_middleware(2500, [], headers=[(b"content-length", b"999999")])
    assert sent[0]["status"] == 413 and read == 0  # a declared size over the limit: nothing is read
    sent, read, body = _run_middleware(2500, [chunk, {"type": "http.request", "body": b"y", "more_body": False}])
    assert sent[0]["status"] == 200 and body == b"x" * 1000 + b"y"  # under the limit: handed on whole


def test_cluster_manifests_keep_ray_ports_inside():
    from crbp_deploy.serving.ray_engine import NEVER_EXPOSE, POD_LABEL, SERVE_PORT, RayConfig, cluster_configs

    files = cluster_configs(RayConfig(replicas=2), "/models")
    policy = yaml.safe_load(files["networkpolicy.yaml"])
    assert policy["kind"] == "NetworkPolicy" and policy["spec"]["podSelector"]["matchLabels"] == POD_LABEL
    open_to_all = [p["port"] for rule in policy["spec"]["ingress"] if "from" not in rule for p in rule["ports"]]
    assert open_to_all == [SERVE_PORT] and SERVE_PORT not in NEVER_EXPOSE
    restricted = [rule for rule in policy["spec"]["ingress"] if "from" in rule]
    assert all(rule.get("ports") or rule["from"] == [{"podSelector": {"matchLabels": POD_LABEL}}] for rule in restricted)
    service = yaml.safe_load(files["rayservice.yaml"])["spec"]
    cluster = service["rayClusterConfig"]
    assert cluster["authOptions"] == {"mode": "token"}
    pods = [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"])]
    assert all(p["metadata"]["labels"] == POD_LABEL for p in pods)  # what the policy selects


# --- real servers ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tiny_store(tmp_path_factory, max_batch_delay_ms=10)


@pytest.fixture(scope="module")
def torchserve(store, tmp_path_factory):
    with served(store["path"], tmp_path_factory.mktemp("ts")) as info:
        yield info


@pytest.fixture(scope="module")
def ray(store, tmp_path_factory):
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'crbp-deploy[ray]')")
    with served(store["path"], tmp_path_factory.mktemp("ray"), engine="ray", timeout=400) as info:
        yield info


ENGINES = {"torchserve": "torchserve", "ray": "ray"}  # engine name -> fixture name


def _ss_listening(pids: set[int]) -> list[tuple[str, int, int]]:
    """(address, port, pid) of the sockets `ss -ltnup` shows listening (TCP) or bound (UDP) for `pids`."""
    if not shutil.which("ss"):
        pytest.skip("ss (iproute2) is not installed")
    out = subprocess.run(["ss", "-ltnupH"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        fields = line.split()
        owners = {int(p) for p in re.findall(r"pid=(\d+)", line)} & pids
        if len(fields) < 5 or not owners:
            continue
        address, port = fields[4].rsplit(":", 1)
        found += [(address.strip("[]"), int(port), pid) for pid in owners]
    return found


@pytest.mark.parametrize("engine", ENGINES)
def test_nothing_listens_beyond_loopback(engine, request):
    server = request.getfixturevalue(ENGINES[engine])
    procs = get_engine(engine).processes(server["run"])
    pids = {p.pid for p in procs}
    seen = _ss_listening(pids)
    ports = {port for _, port, _ in seen}
    assert server["port"] in ports and len(seen) >= (5 if engine == "torchserve" else 9), seen
    print(f"\n{engine}: {len(procs)} processes, ss -ltnup:", sorted(seen, key=lambda s: s[1]))
    outside = [s for s in seen if not is_loopback(s[0])]
    assert not outside, f"listening beyond loopback: {outside}"
    by_psutil = get_engine(engine).listening(server["run"])
    assert {s[1] for s in by_psutil} == ports and all(is_loopback(s[0]) for s in by_psutil)
    for proc in procs:  # every process carries the run marker, or is a child of one that does (Ray's agents
        try:            # rewrite their process title over their environment, which then reads as empty)
            env, parent = proc.environ(), proc.ppid()
        except psutil.Error:
            continue
        assert env.get(RUN_ENV) == str(server["run"].resolve()) or (not env and parent in pids), (proc, parent)
    if engine == "ray":
        assert not any("ray.util.client.server" in " ".join(p.cmdline()) for p in procs)  # no client server
        assert port_free("127.0.0.1", server["port"] + 4)  # where it listened before


def _ray_driver(port: int, env: dict) -> subprocess.CompletedProcess:
    """A process that joins the cluster on 127.0.0.1:port and reads the server's key file in a task."""
    code = ("import ray, sys\n"
            "ray.init(address=sys.argv[1], log_to_driver=False)\n"
            "print('READ', ray.get(ray.remote(lambda p: open(p).read()[:12]).remote(sys.argv[2])))\n")
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return subprocess.run([sys.executable, "-c", code, f"127.0.0.1:{port + 1}", env.pop("key_file")],
                          capture_output=True, text=True, timeout=180, env={**base, **env}, cwd="/")


def test_ray_runs_no_code_without_the_token(ray):
    """What the issue did as an attacker on the machine: join the cluster (GCS on loopback) or its client
    server and run a task that reads the key file. Without the cluster token it is refused; with it (the
    control) the same task runs."""
    loopback = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "key_file": str(ray["run"] / "key_file.json")}
    refused = _ray_driver(ray["port"], {**loopback, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "guess"})
    assert refused.returncode != 0 and "READ" not in refused.stdout
    assert "Authentication token is missing or incorrect" in refused.stderr, refused.stderr[-2000:]
    anonymous = _ray_driver(ray["port"], dict(loopback))
    assert anonymous.returncode != 0 and "READ" not in anonymous.stdout
    token = {**loopback, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(ray["run"] / "ray_token")}
    control = _ray_driver(ray["port"], token)
    assert control.returncode == 0 and "READ {" in control.stdout, control.stderr[-2000:]
    with pytest.raises(OSError):  # no Ray client server (ray://127.0.0.1:P+4)
        socket.create_connection(("127.0.0.1", ray["port"] + 4), timeout=5).close()
    for port in (ray["port"] + 5, ray["port"] + 7):  # dashboard agent, runtime env agent: Ray's HTTP token check
        status, body = _raw(port, b"GET /get_or_create_runtime_env HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert status == 401 and "Missing authentication token" in str(body), (port, status, body)


def test_torchserve_management_api_is_closed(torchserve):
    """TorchServe 0.12 lets the management key scale workers (PUT ...?min_worker=5 answered 202 before).
    serve drops that key and the API key (which mints keys) once ready: nothing on disk can call it."""
    import grpc

    run, port = torchserve["run"], torchserve["port"]
    doc = json.loads((run / "key_file.json").read_text())
    assert set(doc) == {"inference"}
    token = torchserve["token"]
    workers = get_engine("torchserve").worker_processes(run)
    for method, path in [("PUT", "/models/tiny?min_worker=5"), ("GET", "/models"), ("PUT", "/models/tiny/1.0/set-default"),
                         ("GET", "/token?type=management"), ("DELETE", "/models/tiny")]:
        for headers in ([], [f"Authorization: Bearer {token}"]):
            status, body = _raw(port + 1, _request(method, path, b"", headers=headers))
            assert status == 400 and body["type"] == "InvalidKeyException", (method, path, status, body)

    def grpc_call(port, method, request):
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        call = channel.unary_unary(method, request_serializer=lambda x: x, response_deserializer=lambda x: x)
        try:
            return call(request, metadata=[("authorization", f"Bearer {token}")], timeout=10)
        finally:
            channel.close()

    scale = b"\x0a\x04tiny" + b"\x18\x05" + b"\x20\x05"  # ScaleWorkerRequest: model_name, max_worker=5, min_worker=5
    with pytest.raises(grpc.RpcError) as err:
        grpc_call(port + 4, "/org.pytorch.serve.grpc.management.ManagementAPIsService/ScaleWorker", scale)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    ping = grpc_call(port + 3, "/org.pytorch.serve.grpc.inference.InferenceAPIsService/Ping", b"")
    assert b"Healthy" in ping  # the control: the same channel code with the same key reaches inference
    time.sleep(2)
    assert [w.pid for w in get_engine("torchserve").worker_processes(run)] == [w.pid for w in workers]


def test_run_folders_are_private(torchserve, ray):
    from crbp_deploy.serving.ray_engine import temp_dir

    def mode(path):
        return stat.S_IMODE(path.stat().st_mode)

    for run in (torchserve["run"], ray["run"]):
        assert mode(run) == 0o700, run
        assert mode(run / "key_file.json") == 0o600
        for log in run.glob("*.log"):
            assert mode(log) == 0o600, log
    logs = torchserve["run"] / "logs"
    assert mode(logs) == 0o700 and list(logs.glob("*.log"))
    assert all(mode(f) == 0o600 for f in logs.glob("*.log"))
    assert mode(ray["run"] / "ray_token") == 0o600
    assert temp_dir(ray["run"]).parent == ray["run"].resolve() or mode(temp_dir(ray["run"]).parent) == 0o700


def _rss(procs) -> int:
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total


def _upload_chunked(port: int, token: str, total: int) -> tuple[bytes, int]:
    """Send `total` bytes chunked (1 MiB chunks) while reading the answer: (answer, bytes sent)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(f"POST /predictions/tiny HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                 f"Content-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
    chunk = b"%x\r\n" % (1 << 20) + b"\0" * (1 << 20) + b"\r\n"
    answer, sent = bytearray(), 0
    sock.setblocking(False)
    try:
        while sent < total:
            view = memoryview(chunk)
            while view:
                try:
                    view = view[sock.send(view):]
                except BlockingIOError:
                    time.sleep(0.001)
                try:
                    answer += sock.recv(65536)
                except BlockingIOError:
                    pass
            sent += 1 << 20
    except OSError:  # reset once the server refused
        pass
    sock.setblocking(True)
    sock.settimeout(5)
    try:
        while part := sock.recv(65536):
            answer += part
    except OSError:
        pass
    sock.close()
    return bytes(answer), sent


@pytest.mark.parametrize("engine", ENGINES)
def test_oversized_bodies_are_refused_before_they_are_read(engine, request):
    server = request.getfixturevalue(ENGINES[engine])
    procs = get_engine(engine).processes(server["run"])
    status, body = _raw(server["port"], _request("POST", "/predictions/tiny", b"", cl=False,
                                                 headers=["Content-Length: 300000000"], token=server["token"]))
    assert status == 413  # the declared size alone: refused before a byte of the body was sent
    growth = []
    for _ in range(2 if engine == "ray" else 12):
        before = _rss(procs)
        answer, sent = _upload_chunked(server["port"], server["token"], 200 << 20)
        time.sleep(2)
        growth.append((_rss(procs) - before) / 2**20)
        assert sent < 200 << 20, "the whole 200 MB went in before the refusal"
        # Ray answers 413 with a message; TorchServe answers 413 and resets the connection, which can reach
        # the client before the answer does
        assert answer.startswith(b"HTTP/1.1 413") or (engine == "torchserve" and not answer), answer[:200]
        print(f"\n{engine}: 200 MB chunked upload refused after {sent >> 20} MB sent ({answer[:40]!r}); "
              f"memory growth {growth[-1]:.1f} MB")
    if engine == "ray":  # refused in Serve's proxy: at most the limit is held, and let go
        assert b"refused before reading the rest" in answer
        assert max(growth) < 50, growth
    else:  # TorchServe's JVM grows its heap for the first few (measured: +5..78 MB each, to about 390 MB), then
        # collects instead: most later uploads add nothing, though one may still add a heap step (+51.8 MB once, after
        # -25.6, 0.0, 0.1, 0.0). A body kept per upload would add its ~25 MB read before the refusal to every one.
        assert statistics.median(growth[-6:]) < 10, growth
    assert _post(server, sample(80, 32))[0] == 200  # still serving


def _post(server, image, headers=()):
    return _raw(server["port"], _request("POST", "/predictions/tiny", image, headers=list(headers), token=server["token"]))


# --- one HTTP behaviour ------------------------------------------------------------------------------


def _request(method, path, body=b"", *, ctype="image/png", headers=(), token=None, cl=True) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    if ctype:
        lines.append(f"Content-Type: {ctype}")
    if cl:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join([*lines, *headers]) + "\r\n\r\n").encode("latin-1") + body


def _raw(port: int, data: bytes, timeout: float = 30.0):
    """(status, JSON body or text) of one raw request; (None, why) if no answer came within `timeout`."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        sock.sendall(data)
        answer = b""
        while True:
            try:
                part = sock.recv(65536)
            except socket.timeout:
                return None, f"no answer within {timeout} s"
            if not part:
                break
            answer += part
            head, sep, rest = answer.partition(b"\r\n\r\n")
            length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            if sep and length and len(rest) >= int(length.group(1)):
                break
    except ConnectionResetError:
        return None, "connection reset"
    finally:
        sock.close()
    head, _, rest = answer.partition(b"\r\n\r\n")
    if not head:
        return None, "closed without an answer"
    status = int(head.split()[1])
    try:
        return status, json.loads(rest)
    except ValueError:
        return status, rest.decode("latin-1")


def _message(body) -> str:
    return body.get("message", "") if isinstance(body, dict) else str(body)


BOUNDARY = uuid.uuid4().hex
IMAGE = sample(80, 32)


def _cases():
    """(name, request(token), check(status, body) -> None): what both engines must answer alike."""
    image, tiff = IMAGE, float_tiff(np.nan)

    def post(path, body=image, **kw):
        return lambda token: _request("POST", path, body, token=token, **kw)

    def status(code, *words):
        def check(s, body):
            assert s == code and all(w in _message(body) for w in words), (s, body)
        return check

    def budget(key, value):
        def check(s, body):
            assert s == 200 and body["budget"]["requested"][key] == value, (s, body)
        return check

    def tol_only(s, body):
        assert s == 400 and "tol" in _message(body) and "max_iters" not in _message(body), (s, body)

    def client_error(s, body):
        assert 400 <= s < 500 and _message(body), (s, body)

    form = multipart({"data": (image, "image/png")})
    return [
        ("unknown path", lambda t: _request("GET", "/nope", token=t, ctype=None), status(404, "resource is not found")),
        ("POST to an unknown path", post("/nope"), status(404, "resource is not found")),
        ("/predictions without a model", post("/predictions"), status(404, "resource is not found")),
        ("unknown model", post("/predictions/nope"), status(404, "Model not found: nope")),
        ("/predictions/NAME/extra", post("/predictions/tiny/extra"), status(404, "Model version: extra does not exist")),
        ("/predictions/NAME/VERSION", post("/predictions/tiny/1.0"), status(200)),
        ("/invocations without model_name (one model)", post("/invocations"), status(200)),
        ("/invocations, unknown model", post("/invocations?model_name=nope"), status(404, "Model not found: nope")),
        ("POST /ping", post("/ping", b""), status(200)),
        ("wrong token", lambda t: _request("POST", "/predictions/tiny", image, token="wrong"), status(400, "Token")),
        ("no token", lambda t: _request("GET", "/ping", ctype=None), status(400, "Token")),
        ("8 KiB URL", post("/predictions/tiny?x=" + "a" * 8200), status(400)),
        ("4 KiB URL", post("/predictions/tiny?x=" + "a" * 4000), status(200)),
        ("9 KiB of headers", post("/predictions/tiny", headers=["X-Pad: " + "a" * 9000]), status(400)),
        ("X-Max-Iters twice: the last counts", post("/predictions/tiny", headers=["X-Max-Iters: 3", "X-Max-Iters: 5"]),
         budget("max_iters", 5)),
        ("X-Tol twice: the last counts", post("/predictions/tiny", headers=["X-Tol: 0.1", "X-Tol: 0.2"]), budget("tol", 0.2)),
        ("max_iters as parameter and header, different", post("/invocations?max_iters=3", headers=["X-Max-Iters: 4"]),
         status(400, "max_iters given twice with different values")),
        ("negative tol: the error is about tol only", post("/predictions/tiny", headers=["X-Tol: -1"]), tol_only),
        ("max_iters 0 names the server's limit", post("/predictions/tiny", headers=["X-Max-Iters: 0"]),
         status(400, "max_iters=0", "at most max_iters=200")),
        ("NaN pixels", post("/predictions/tiny", tiff, ctype="image/tiff"), status(400, "NaN or infinite")),
        ("infinite pixels", post("/predictions/tiny", float_tiff(np.inf), ctype="image/tiff"), status(400, "NaN or infinite")),
        ("multipart without boundary", post("/predictions/tiny", b"--x\r\nhello", ctype="multipart/form-data"),
         client_error),
        ("multipart, garbage body", post("/predictions/tiny", b"garbage", ctype=f"multipart/form-data; boundary={BOUNDARY}"),
         status(400)),
        ("multipart, valid", post("/predictions/tiny", form[0], ctype=form[1]), status(200)),
        ("Content-Length over the limit", post("/predictions/tiny", b"", cl=False, headers=[f"Content-Length: {LIMIT + 1}"]),
         status(413)),
    ]


def test_both_engines_answer_every_case_alike(torchserve, ray):
    for name, build, check in _cases():
        answers = {}
        for engine, server in (("torchserve", torchserve), ("ray", ray)):
            status, body = _raw(server["port"], build(server["token"]))
            assert status is not None, (name, engine, body)
            check(status, body)
            answers[engine] = (status, body)
        (ts_status, ts_body), (ray_status, ray_body) = answers["torchserve"], answers["ray"]
        assert ts_status // 100 == ray_status // 100, (name, answers)
        if isinstance(ts_body, dict) and "error" in ts_body and not name.startswith("multipart"):
            assert ts_body == ray_body, (name, answers)  # the service's own errors: the same words
        if ts_status == 200:
            assert {k: v for k, v in ts_body.items() if k not in ("timings_ms", "batch_size")} == \
                   {k: v for k, v in ray_body.items() if k not in ("timings_ms", "batch_size")}, name
        if isinstance(ts_body, dict) and "type" in ts_body and isinstance(ray_body, dict) and ts_status == 404:
            assert ts_body["type"] == ray_body["type"] and ts_body["message"] == ray_body["message"], (name, answers)


def test_where_torchserve_answers_before_the_handler(torchserve, ray):
    """TorchServe's Java front end answers these before the handler runs, or hands the handler too little to
    tell (it gets no HTTP method); Ray does the HTTP-correct thing. docs/deploy.md lists each."""
    image, ts, rs = IMAGE, torchserve, ray
    nameless = (f"--{BOUNDARY}\r\nContent-Disposition: form-data\r\n\r\nabc\r\n--{BOUNDARY}--\r\n").encode()
    cases = [
        # (name, request(token), TorchServe: (status, words), Ray: (status, words))
        ("PUT", lambda t: _request("PUT", "/predictions/tiny", image, token=t), (200, ""), (405, "method is not allowed")),
        ("PATCH", lambda t: _request("PATCH", "/predictions/tiny", image, token=t), (200, ""), (405, "method is not allowed")),
        ("DELETE", lambda t: _request("DELETE", "/predictions/tiny", token=t), (400, "empty input"), (405, "method is not allowed")),
        ("GET", lambda t: _request("GET", "/predictions/tiny", token=t), (400, "empty input"), (405, "method is not allowed")),
        ("multipart part without a name",
         lambda t: _request("POST", "/predictions/tiny", nameless, token=t, ctype=f"multipart/form-data; boundary={BOUNDARY}"),
         (500, "NullPointerException"), (400, "no image in the request")),
        ("OPTIONS / without a token", lambda t: _request("OPTIONS", "/", ctype=None), (200, "openapi"), (400, "Token")),
        ("/predictions/NAME/VERSION/extra", lambda t: _request("POST", "/predictions/tiny/1.0/x", image, token=t),
         (200, ""), (404, "resource is not found")),
    ]
    for name, build, (ts_code, ts_words), (ray_code, ray_words) in cases:
        status, body = _raw(ts["port"], build(ts["token"]))
        assert status == ts_code and ts_words in json.dumps(body), (name, status, body)
        status, body = _raw(rs["port"], build(rs["token"]))
        assert status == ray_code and ray_words in json.dumps(body), (name, status, body)
    negative = _request("POST", "/predictions/tiny", image, cl=False, headers=["Content-Length: -5"], token=ts["token"])
    assert _raw(ts["port"], negative, timeout=3) == (None, "no answer within 3 s")  # TorchServe: silence
    status, body = _raw(rs["port"], negative.replace(ts["token"].encode(), rs["token"].encode()))
    assert status == 400 and "Invalid HTTP request" in str(body)


# --- stop means stopped ------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_start_stop_twice_on_one_port_leaves_nothing(engine, store, tmp_path):
    if engine == "ray":
        pytest.importorskip("ray.serve", reason="Ray Serve is not installed")
    port, run = free_ports(10), tmp_path / "run"
    for round_ in range(2):  # the second start proves the port and the run folder are free again
        started = cli("serve", "--engine", engine, "--model-store", store["path"], "--port", port, "--run-dir", run,
                      timeout=400)
        assert started.returncode == 0, (round_, started.stdout + started.stderr)
        procs = get_engine(engine).processes(run)
        ports = {s[1] for s in get_engine(engine).listening(run)}
        assert port in ports and len(procs) >= 2
        token = read_keys(run)["inference"]
        status, _ = _raw(port, _request("POST", "/predictions/tiny", IMAGE, token=token))
        assert status == 200
        began = time.monotonic()
        stopped = cli("serve", "--stop", "--engine", engine, "--port", port, "--run-dir", run, timeout=200)
        took = time.monotonic() - began
        assert stopped.returncode == 0 and "stopped" in stopped.stdout, stopped.stdout + stopped.stderr
        alive = [p.pid for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not alive and not get_engine(engine).processes(run), alive
        busy = sorted(p for p in ports if not port_free("127.0.0.1", p))
        assert not busy, f"ports still in use after stop: {busy}"
        print(f"\n{engine} round {round_ + 1}: {len(procs)} processes on ports {sorted(ports)}; stop took {took:.1f} s")
