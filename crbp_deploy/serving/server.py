"""Start, check and stop a real TorchServe with a generated configuration.

Why each choice (measured on TorchServe 0.12):
- Everything lives in a run folder (config.properties, metrics.yaml, key_file.json, logs/, the pid
  file, the worker sockets, the unpacked archives): TorchServe silently reads a config.properties
  in its working directory and writes its pid file and sockets to the shared temp folder, so it is
  started with the run folder as working directory, TMPDIR and TEMP, and an explicit --ts-config.
- Models are registered at startup (`load_models`) with their archive's model-config.yaml (workers,
  batch size, delay, timeout); the management API's register/unregister calls stay off
  (`enable_model_api=false`, TorchServe's default), the read-only calls are used to wait until
  every worker is READY.
- Token auth stays on unless asked: TorchServe writes key_file.json (inference, management and API
  keys) into the run folder; even /ping answers 400 without the inference key.
- The management key is dropped once the workers are READY: TorchServe 0.12 lets it scale workers and
  set default versions whatever `enable_model_api` says (measured: `PUT /models/NAME?min_worker=5`
  answered 202 and started five workers; gRPC's ScaleWorker is not gated either), and the API key can
  mint a new management key. key_file.json keeps only the inference key, so the management API (HTTP
  P+1, gRPC P+4, both on 127.0.0.1) refuses every call from then on; the keys exist only in
  TorchServe's memory. Inference keys are renewed by restarting.
- Least privilege on disk: the run folder is mode 700 and TorchServe starts with umask 077, so its logs
  (the access log records URLs, a token sent as `?token=` included) are 600 in a 700 folder.
- Every process carries `CRBP_DEPLOY_RUN=<run folder>` (engine.RUN_ENV): `stop` ends the Java process,
  its workers and anything else the server left, and returns when none is alive.
- `metrics_mode=prometheus` with a metrics YAML that declares this project's model metrics, so
  /metrics on the metrics port shows them (TorchServe exposes only declared backend metrics).
- TorchServe always opens gRPC ports; they are put at P+3 / P+4 on 127.0.0.1 so two servers on
  different ports do not collide on 7070/7071.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from ..config import StrictConfig
from ..errors import ConfigError, CrbpError
from . import metrics as model_metrics
from .engine import KEY_FILE, Engine, Running, end_processes, http_get, private_log, read_keys, write_private

JAVA_MAIN = "org.pytorch.serve.ModelServer"
PID_FILE = ".model_server.pid"


@dataclass(frozen=True)
class ServerConfig(StrictConfig):
    """TorchServe settings this project controls; ports are P (inference), P+1 (management), P+2 (metrics)."""

    port: int = 8080
    host: str = "127.0.0.1"
    auth: bool = True
    token_expiration_min: int = 24 * 60  # TorchServe's default of 60 makes a day-long server reject its own key
    max_request_bytes: int = 21 * 1024 * 1024  # the handler's 20 MiB image limit plus multipart overhead
    max_response_bytes: int = 64 * 1024 * 1024
    # per model; TorchServe answers 503 when it is full. A worker cannot see this queue (admission control in
    # the service judges what reaches it), so its depth is the bound on waiting: 32 requests of the bundled
    # model at 128 px clear in a few seconds, a deeper queue only lets waits grow past every deadline
    job_queue_size: int = 32
    startup_timeout_s: float = 300.0
    envelope: str = ""  # "kservev2": KServe's Open Inference Protocol v2 on /v2/models/NAME/infer (as on KServe)

    def validate(self) -> None:
        if not 1024 <= self.port <= 65535 - 4:
            raise ConfigError(f"port must be in 1024..65531 (P..P+4 are used), got {self.port}")
        if self.token_expiration_min < 1 or self.job_queue_size < 1 or self.startup_timeout_s <= 0:
            raise ConfigError("token_expiration_min, job_queue_size and startup_timeout_s must be positive")
        if self.envelope not in ("", "kserve", "kservev2"):
            raise ConfigError(f"envelope must be '', 'kserve' or 'kservev2', got {self.envelope!r}")

    def ports(self) -> dict[str, int]:
        p = self.port
        return {"inference": p, "management": p + 1, "metrics": p + 2, "grpc_inference": p + 3, "grpc_management": p + 4}


@dataclass
class Server(Running):
    """A running TorchServe started by `start`."""

    engine: ClassVar[str] = "torchserve"
    title: ClassVar[str] = "TorchServe"
    pid: int = 0

    def url(self, api: str = "inference") -> str:
        return f"http://{self.config.host}:{self.config.ports()[api]}"

    @property
    def metrics_url(self) -> str:
        return f"{self.url('metrics')}/metrics"

    def status(self) -> str:
        return f"pid {self.pid}"

    def links(self) -> list[str]:
        return [f"  management:  {self.url('management')}/models (closed: serve drops the management key once ready)",
                f"  metrics:     {self.metrics_url}"]


def metrics_yaml() -> str:
    """TorchServe's default metrics YAML plus this project's model metrics."""
    import yaml

    import ts

    default = Path(ts.__file__).parent / "configs" / "metrics.yaml"
    doc = yaml.safe_load(default.read_text())
    model = doc.setdefault("model_metrics", {}) or {}
    doc["model_metrics"] = model
    for kind, entries in model_metrics.yaml_entries().items():
        listed = model.setdefault(kind, []) or []
        model[kind] = [e for e in listed if e["name"] not in {x["name"] for x in entries}] + entries
    return yaml.safe_dump(doc, sort_keys=False)


def config_properties(config: ServerConfig, model_store: Path, models: list[str], metrics_config: Path) -> str:
    """The generated config.properties (every value this project relies on is explicit)."""
    host, ports = config.host, config.ports()
    props = {
        "inference_address": f"http://{host}:{ports['inference']}",
        "management_address": f"http://{host}:{ports['management']}",
        "metrics_address": f"http://{host}:{ports['metrics']}",
        "grpc_inference_address": host,
        "grpc_management_address": host,
        "grpc_inference_port": ports["grpc_inference"],
        "grpc_management_port": ports["grpc_management"],
        "model_store": str(model_store),
        "load_models": ",".join(f"{m}.mar" for m in models),
        "enable_model_api": "false",
        "disable_token_authorization": "false" if config.auth else "true",
        "token_expiration_min": config.token_expiration_min,
        "metrics_mode": "prometheus",
        "enable_metrics_api": "true",
        "metrics_config": str(metrics_config),
        "max_request_size": config.max_request_bytes,
        "max_response_size": config.max_response_bytes,
        "job_queue_size": config.job_queue_size,
        "install_py_dep_per_model": "false",
        "enable_envvars_config": "false",
    }
    if config.envelope:
        props["service_envelope"] = config.envelope
    lines = ["# generated by crbp-deploy serve; TorchServe reads only this file (--ts-config)"]
    lines += [f"{k}={v}" for k, v in props.items()]
    return "\n".join(lines) + "\n"


def _server_process(run_dir: Path):
    """The live TorchServe Java process recorded in `run_dir`, or None (a stale pid file is removed)."""
    import psutil

    pid_file = run_dir / PID_FILE
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    try:
        proc = psutil.Process(pid)
        if JAVA_MAIN in proc.cmdline() and proc.status() != psutil.STATUS_ZOMBIE:
            return proc
    except psutil.Error:
        pass
    pid_file.unlink(missing_ok=True)
    return None


def _log_tail(run_dir: Path, lines: int = 25) -> str:
    chunks = []
    for name in ("launcher.log", "logs/ts_log.log", "logs/model_log.log"):
        path = run_dir / name
        if path.is_file():
            text = path.read_text(errors="replace").splitlines()[-lines:]
            chunks.append(f"--- {path} (last {len(text)} lines) ---\n" + "\n".join(text))
    return "\n".join(chunks)


def _load_failure(run_dir: Path, name: str) -> str | None:
    """The worker's exception when TorchServe reports that `name` failed to load, else None."""
    try:
        if f"Load model failed: {name}," not in (run_dir / "logs" / "ts_log.log").read_text(errors="replace"):
            return None
        lines = (run_dir / "logs" / "model_log.log").read_text(errors="replace").splitlines()
    except OSError:
        return None
    errors = [line.split("MODEL_LOG - ", 1)[1] for line in lines if "MODEL_LOG - " in line]
    errors = [e for e in errors if re.match(r"^[A-Za-z_][\w.]*(Error|Exception): ", e)]
    return errors[-1] if errors else "the worker died while loading it"


def _wait_ready(server: Server, proc, say) -> None:
    deadline = time.monotonic() + server.config.startup_timeout_s

    def alive() -> None:
        if not proc.is_running() or proc.status() == "zombie":
            raise CrbpError(f"TorchServe exited during startup\n{_log_tail(server.run_dir)}")
        if time.monotonic() > deadline:
            raise CrbpError(
                f"TorchServe was not ready within {server.config.startup_timeout_s:.0f} s\n{_log_tail(server.run_dir)}"
            )

    while True:  # health: /ping with the inference key (TorchServe refuses it without one)
        alive()
        if server.config.auth:
            server.keys = read_keys(server.run_dir)
            if not server.keys:
                time.sleep(0.2)
                continue
        try:
            status, body = http_get(f"{server.url()}/ping", server.token)
            if status == 200 and isinstance(body, dict) and body.get("status") == "Healthy":
                break
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    say(f"healthy; waiting for {', '.join(server.models)} to load")
    pending = set(server.models)
    while pending:  # registration happened at startup (load_models); wait until each model's workers are READY
        alive()
        for name in sorted(pending):
            failure = _load_failure(server.run_dir, name)
            if failure:
                raise CrbpError(f"model {name} failed to load: {failure} (log: {server.run_dir / 'logs' / 'model_log.log'})")
            try:
                status, body = http_get(f"{server.url('management')}/models/{name}", server.keys.get("management"))
            except (urllib.error.URLError, OSError):
                continue
            if status == 200 and isinstance(body, list) and body:
                workers = body[0].get("workers") or []
                want = int(body[0].get("minWorkers") or 1)
                if sum(w.get("status") == "READY" for w in workers) >= want:
                    pending.discard(name)
        if pending:
            time.sleep(0.5)


class TorchServe(Engine):
    """TorchServe on one machine; a model scales with its workers (`crbp-deploy package --workers N`)."""

    name = "torchserve"
    noun = "TorchServe"
    stopped = "stopped TorchServe (pid {pid}); the Java process and its workers have exited"
    gone = "TorchServe exited on its own; see {logs}"
    requires = (("ts", "torchserve"), ("model_archiver", "torch-model-archiver"), ("yaml", "pyyaml"))
    install = "serving needs {missing}: pip install 'crbp-deploy[serve]'"

    def check_installed(self) -> None:
        """TorchServe, torch-model-archiver and pyyaml importable, and the Java 17 runtime it launches."""
        super().check_installed()
        java = Path(os.environ["JAVA_HOME"]) / "bin" / "java" if os.environ.get("JAVA_HOME") else shutil.which("java")
        if not java or not Path(java).exists():
            raise CrbpError("TorchServe needs Java 17 (no `java` on PATH and no JAVA_HOME); install openjdk-17-jre-headless")

    def configure(self, port: int, auth: bool = True, replicas: int | None = None) -> ServerConfig:
        if replicas is not None:
            raise CrbpError("--replicas is for --engine ray; TorchServe scales with workers: crbp-deploy package --workers N")
        return ServerConfig(port=port, auth=auth)

    def running(self, run_dir) -> int | None:
        proc = _server_process(Path(run_dir))
        return proc.pid if proc else None

    def log_dir(self, run_dir) -> Path:
        return Path(run_dir) / "logs"

    def worker_processes(self, run_dir) -> list:
        """The live model worker processes (psutil) of the TorchServe recorded in `run_dir`: the Python
        children of the Java process. Fault tests kill them; the soak benchmark reads their memory."""
        import psutil

        proc = _server_process(Path(run_dir))
        if proc is None:
            return []
        found = []
        for child in proc.children(recursive=True):
            try:
                if child.status() != psutil.STATUS_ZOMBIE and any("model_service_worker" in a for a in child.cmdline()):
                    found.append(child)
            except psutil.Error:
                continue
        return found

    def start(self, model_store, config: ServerConfig | None = None, *, run_dir=None, models=None,
              env: dict[str, str] | None = None, progress=None) -> Server:
        """Start TorchServe, wait until /ping is healthy and every model's workers are READY.

        `models` defaults to every .mar in the store. `env` adds environment variables for the server
        (and its workers). `progress(msg)` is called with status lines. On failure the server is stopped
        and the error carries the tail of its logs.
        """
        config = config or ServerConfig()
        say = progress or (lambda msg: None)
        store, models, run = self.prepare(model_store, config, run_dir, models)
        (run / KEY_FILE).unlink(missing_ok=True)  # never read a previous server's keys
        shutil.rmtree(run / "models", ignore_errors=True)  # archives a previous server unpacked here
        write_private(run / "metrics.yaml", metrics_yaml())
        cfg = run / "config.properties"
        write_private(cfg, config_properties(config, store, models, run / "metrics.yaml"))
        server_env = self.environment(run, env)
        server_env.update(TMPDIR=str(run), TEMP=str(run), LOG_LOCATION=str(run / "logs"), METRICS_LOCATION=str(run / "logs"))
        server_env.pop("TS_CONFIG_FILE", None)  # would override --ts-config
        say(f"starting TorchServe (run folder {run})")
        with private_log(run / "launcher.log") as log:
            launcher = subprocess.run(
                [sys.executable, "-m", "ts.model_server", "--start", "--ts-config", str(cfg), "--model-store", str(store), "--ncs"],
                cwd=run, env=server_env, stdout=log, stderr=subprocess.STDOUT, timeout=120, umask=0o077,
            )
        proc = _server_process(run)
        if launcher.returncode != 0 or proc is None:
            raise CrbpError(f"TorchServe did not start (launcher exit code {launcher.returncode})\n{_log_tail(run)}")
        server = Server(run_dir=run, config=config, pid=proc.pid, models=models)
        try:
            _wait_ready(server, proc, say)
            if config.auth:
                server.keys = _drop_management_keys(run)
        except BaseException:
            self.stop(run)
            raise
        return server

    def stop(self, run_dir, timeout: float | None = None) -> bool:
        """Stop the TorchServe recorded in `run_dir` and wait until the Java process, its workers and any
        other process of this run have exited (SIGTERM, then SIGKILL after `timeout`, default 60 s). False if
        none was running."""
        import psutil

        run = Path(run_dir)
        proc = _server_process(run)
        stray = self.processes(run)
        if proc is None and not stray:
            return False
        if proc is not None:
            try:
                workers = proc.children(recursive=True)
                proc.terminate()
                try:
                    proc.wait(timeout=60.0 if timeout is None else timeout)
                except psutil.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
            except psutil.NoSuchProcess:
                workers = []
            end_processes(workers, 15.0)
        end_processes(self.processes(run), 15.0)  # whatever else carries this run's marker
        left = self.processes(run)
        if left:
            raise CrbpError(f"processes of the TorchServe in {run} survived SIGKILL: {sorted(p.pid for p in left)}")
        (run / PID_FILE).unlink(missing_ok=True)
        (run / KEY_FILE).unlink(missing_ok=True)  # the keys die with the server
        return True


def _drop_management_keys(run: Path) -> dict[str, str]:
    """Rewrite key_file.json with the inference key only (mode 600) and return {"inference": key}: the
    management key can scale workers and the API key can mint a management key, and serve needs neither
    once every worker is READY."""
    doc = json.loads((run / KEY_FILE).read_text())
    write_private(run / KEY_FILE, json.dumps({"inference": doc["inference"]}, indent=2))
    return {"inference": doc["inference"]["key"]}
