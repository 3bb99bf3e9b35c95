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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..config import StrictConfig
from ..errors import ConfigError, CrbpError
from .engine import KEY_FILE, Engine, Running, http_get, store_models

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
    """`ray start --head` with every port pinned to P+1..P+8 on 127.0.0.1 and Ray's temp dir in the run folder."""
    ports = config.ports()
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
        tail = (run / "ray-start.log").read_text(errors="replace").strip().splitlines()[-5:]
        raise CrbpError(f"ray start failed (exit {done.returncode}): {' / '.join(tail)}")


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

    def start(self, model_store, config: RayConfig | None = None, *, run_dir=None, models=None, progress=None) -> RayServer:
        """Start a local Ray cluster on 127.0.0.1, deploy every archive of `model_store` with `config.replicas`
        replicas, wait until /ping answers. On failure the cluster is stopped and the error names the log folder."""
        config = config or RayConfig()
        say = progress or (lambda msg: None)
        store, served, run = self.prepare(model_store, config, run_dir, models)
        if set(served) != set(store_models(store)):  # ray_app deploys the whole store
            raise CrbpError("the Ray engine serves every archive in the model store; give it a store with only those")
        for path in (temp_dir(run), run / "models", run / KEY_FILE, run / STATE_FILE):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        token = None
        if config.auth:  # TorchServe's key file layout, so `predict --url` and the tests read it the same way
            token = secrets.token_urlsafe(12)
            (run / KEY_FILE).write_text(json.dumps({"inference": {"key": token}}))
            (run / KEY_FILE).chmod(0o600)
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": str(config.threads)}
        try:
            _ray_start(run, config, env, say)
            (run / STATE_FILE).write_text(json.dumps({"engine": "ray", "port": config.port, "gcs": config.ports()["gcs"],
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
            (run / name).write_text(text)
            files[name] = run / name
        return RayServer(run, config, served, {"inference": token} if token else {}, files)

    def stop(self, run_dir, timeout: float | None = None) -> bool:
        """End this cluster's processes (SIGTERM, then SIGKILL after `timeout`, default 15 s); False if none
        was running (a state file left by a dead cluster counts as running: it is cleaned up)."""
        import psutil

        run = Path(run_dir)
        procs = _cluster_processes(run)
        for proc in procs:
            try:
                proc.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=15.0 if timeout is None else timeout)
        for proc in alive:
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=10)
        had_state = (run / STATE_FILE).exists()
        (run / STATE_FILE).unlink(missing_ok=True)
        (run / KEY_FILE).unlink(missing_ok=True)
        return bool(procs) or had_state


ENGINE = RayServe()
# module-level names kept for the callers that import them (the client, benchmarks)
start, default_run_dir = ENGINE.start, ENGINE.default_run_dir
