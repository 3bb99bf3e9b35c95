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
- ports: P (HTTP), P+1 (GCS), P+2..P+8 (Ray's node manager, object manager, client server, dashboard
  agent, runtime env agent, metrics), all on 127.0.0.1, so two clusters on different P do not collide.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.error
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import StrictConfig
from ..errors import ConfigError, CrbpError

STATE_FILE = "ray-state.json"
SERVE_CONFIG = "serve_config.yaml"
RAYSERVICE = "rayservice.yaml"
APP_NAME = "crbp"
IMPORT_PATH = "crbp_deploy.serving.ray_app:build_app"
PORT_NAMES = ("http", "gcs", "node_manager", "object_manager", "client_server", "dashboard_agent_listen",
              "dashboard_agent_grpc", "runtime_env_agent", "metrics_export")


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
        return {name: self.port + i for i, name in enumerate(PORT_NAMES)}


def default_run_dir(port: int) -> Path:
    from .server import default_run_dir as torchserve_dir

    return torchserve_dir(port).parent / f"ray-{port}"


def temp_dir(run: Path) -> Path:
    """Ray's temp dir for this run folder: inside it, unless that path is too long for the Unix sockets
    Ray puts 60 characters below it (107 at most); then a short folder in the system temp dir, named
    after the run folder so `stop` finds the same one."""
    run = Path(run).resolve()
    inside = run / "ray"
    if len(str(inside)) <= 45:
        return inside
    import hashlib
    import tempfile

    return Path(tempfile.gettempdir()) / f"crbp-ray-{hashlib.sha1(str(run).encode()).hexdigest()[:10]}"


def check_installed() -> None:
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError:
        raise CrbpError("the Ray engine needs Ray Serve: pip install 'crbp-deploy[ray]'") from None


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


def cluster_configs(config: RayConfig, model_store: str, batch_size: int = 8) -> dict[str, str]:
    """{file name: YAML}: a Ray Serve config for `serve deploy` on any Ray cluster, and a KubeRay RayService
    embedding it. `model_store` must be readable at that path on every node (shared volume or image)."""
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
                 "resources": {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"cpu": "2", "memory": "4Gi"}}}
    rayservice = {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": "crbp-panoptic"},
        "spec": {
            "serveConfigV2": yaml.safe_dump(serve_config, sort_keys=False),
            "rayClusterConfig": {
                "rayVersion": ray.__version__,
                "headGroupSpec": {"rayStartParams": {"num-cpus": "0"},  # the head runs the proxy, not replicas
                                  "template": {"spec": {"containers": [container]}}},
                "workerGroupSpecs": [{
                    "groupName": "cpu", "replicas": 1, "minReplicas": 1,
                    "maxReplicas": autoscaling_config(config, batch_size)["max_replicas"],
                    "rayStartParams": {}, "template": {"spec": {"containers": [container]}},
                }],
                "enableInTreeAutoscaling": True,
            },
        },
    }
    return {SERVE_CONFIG: yaml.safe_dump(serve_config, sort_keys=False),
            RAYSERVICE: yaml.safe_dump(rayservice, sort_keys=False)}


def _cluster_processes(run: Path) -> list:
    """This cluster's processes: those naming its temp dir (GCS, raylet, agents) and all their children."""
    import psutil

    marker = f"{temp_dir(run)}{os.sep}"  # its session folders, not a sibling that shares the prefix
    roots = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in arg for arg in proc.info["cmdline"] or []):
                roots.append(proc)
        except psutil.Error:
            continue
    found = {p.pid: p for p in roots}
    for proc in roots:
        try:
            for child in proc.children(recursive=True):
                found.setdefault(child.pid, child)
        except psutil.Error:
            continue
    return [p for pid, p in found.items() if pid != os.getpid()]


def running(run_dir: str | os.PathLike) -> dict | None:
    """The state of a live cluster started from `run_dir`, or None."""
    run = Path(run_dir)
    try:
        state = json.loads((run / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return state if _cluster_processes(run) else None


def _get(url: str, token: str | None) -> int:
    import urllib.request

    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


@dataclass
class RayServer:
    run_dir: Path
    config: RayConfig
    models: list[str]
    token: str | None
    files: dict[str, Path]

    def url(self) -> str:
        return f"http://{self.config.host}:{self.config.port}"

    def predictions_url(self, model: str) -> str:
        return f"{self.url()}/predictions/{model}"

    @property
    def key_file(self) -> Path | None:
        return self.run_dir / "key_file.json" if self.config.auth else None

    def stop(self, timeout: float = 15.0) -> bool:
        return stop(self.run_dir, timeout)


def start(model_store, config: RayConfig | None = None, *, run_dir=None, progress=None) -> RayServer:
    """Start a local Ray cluster on 127.0.0.1, deploy every archive of `model_store` with `config.replicas`
    replicas, wait until /ping answers. On failure the cluster is stopped and the error names the log folder."""
    from .server import _port_free, store_models

    config = config or RayConfig()
    say = progress or (lambda msg: None)
    check_installed()
    store = Path(model_store).resolve()
    models = store_models(store) if store.is_dir() else []
    if not models:
        raise CrbpError(f"no .mar archives in {store}; build one first: crbp-deploy package")
    run = Path(run_dir or default_run_dir(config.port)).resolve()
    run.mkdir(parents=True, exist_ok=True)
    if running(run):
        raise CrbpError(f"a Ray cluster from {run} is already running; stop it: crbp-deploy serve --stop --port {config.port}")
    busy = [f"{name} {port}" for name, port in config.ports().items() if not _port_free(config.host, port)]
    if busy:
        raise CrbpError(f"port(s) in use on {config.host}: {', '.join(busy)}; choose another --port")
    for path in (temp_dir(run), run / "models", run / "key_file.json", run / STATE_FILE):
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    token = None
    if config.auth:  # TorchServe's key file layout, so `predict --url` and the tests read it the same way
        token = secrets.token_urlsafe(12)
        (run / "key_file.json").write_text(json.dumps({"inference": {"key": token}}))
        (run / "key_file.json").chmod(0o600)
    ports = config.ports()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": str(config.threads)}
    cpus = max(os.cpu_count() or 1, config.replicas * config.threads)
    say(f"starting a local Ray cluster on {config.host} (run folder {run})")
    args = [
        str(Path(sys.executable).with_name("ray")), "start", "--head", f"--node-ip-address={config.host}",
        f"--port={ports['gcs']}", f"--node-manager-port={ports['node_manager']}",
        f"--object-manager-port={ports['object_manager']}", f"--ray-client-server-port={ports['client_server']}",
        f"--dashboard-agent-listen-port={ports['dashboard_agent_listen']}",
        f"--dashboard-agent-grpc-port={ports['dashboard_agent_grpc']}",
        f"--runtime-env-agent-port={ports['runtime_env_agent']}", f"--metrics-export-port={ports['metrics_export']}",
        "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir(run)}",
        f"--num-cpus={cpus}", "--object-store-memory=100000000",
    ]
    with open(run / "ray-start.log", "wb") as log:
        done = subprocess.run(args, cwd=run, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=180)
    if done.returncode != 0:
        stop(run)
        tail = (run / "ray-start.log").read_text(errors="replace").strip().splitlines()[-5:]
        raise CrbpError(f"ray start failed (exit {done.returncode}): {' / '.join(tail)}")
    (run / STATE_FILE).write_text(json.dumps({"engine": "ray", "port": config.port, "gcs": ports["gcs"],
                                              "models": models, "replicas": config.replicas}))
    try:
        _deploy(run, store, config, env, say)
        deadline = time.monotonic() + config.startup_timeout_s
        while True:
            try:
                if _get(f"http://{config.host}:{config.port}/ping", token) == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise CrbpError(f"Ray Serve did not answer /ping within {config.startup_timeout_s:.0f} s; logs in {temp_dir(run)}")
            time.sleep(0.5)
    except BaseException:
        stop(run)
        raise
    files = {}
    for name, text in cluster_configs(config, str(store), _batch_size(run / "models")).items():
        (run / name).write_text(text)
        files[name] = run / name
    return RayServer(run, config, models, token, files)


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
                 "key_file": str(run / "key_file.json") if config.auth else None},
    }
    with open(run / "ray-deploy.log", "wb") as log:
        try:
            done = subprocess.run([sys.executable, "-c", DEPLOY, json.dumps(spec)], cwd=run, env=env, stdout=log,
                                  stderr=subprocess.STDOUT, timeout=config.startup_timeout_s)
        except subprocess.TimeoutExpired:
            raise CrbpError(f"deploying on Ray took longer than {config.startup_timeout_s:.0f} s; see {run / 'ray-deploy.log'}") from None
    if done.returncode != 0:
        lines = [ln for ln in (run / "ray-deploy.log").read_text(errors="replace").splitlines() if ln.strip()]
        errors = [ln for ln in lines if "Error" in ln or "Exception" in ln]
        raise CrbpError(f"deploying on Ray failed: {(errors or lines or ['no output'])[-1].strip()} (log: {run / 'ray-deploy.log'})")


def stop(run_dir, timeout: float = 15.0) -> bool:
    """End this cluster's processes (SIGTERM, then SIGKILL after `timeout`); False if none was running."""
    import psutil

    run = Path(run_dir)
    procs = _cluster_processes(run)
    for proc in procs:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=10)
    had_state = (run / STATE_FILE).exists()
    (run / STATE_FILE).unlink(missing_ok=True)
    (run / "key_file.json").unlink(missing_ok=True)
    return bool(procs) or had_state
