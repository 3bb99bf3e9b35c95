"""Triton Inference Server as the third engine: the real `tritonserver` (2.51, from the nvidia-pytriton
0.7.0 wheel) on 127.0.0.1, serving a model repository written by `crbp-deploy package --format triton`.

Why it is built this way (measured on this CPU machine):
- Only the wheel's server files are used (binary, Python backend, stubs); `make setup` installs it with
  --no-deps because its own Python API pins numpy<2.
- The Python backend runs `backends/python/triton_python_backend_stub`, which the wheel keeps apart per
  CPython version (`python_backend_stubs/3.X/`). `start` assembles a backend folder in the run folder (the
  backend library, its utils module and the stub of this interpreter's version), so site-packages is
  never written to; the stub finds its bundled libraries (libcudart ...) through LD_LIBRARY_PATH.
- Ports: P (HTTP, KServe v2), P+1 (gRPC), P+2 (Prometheus metrics), all on 127.0.0.1; SageMaker and
  Vertex AI endpoints off.
- Auth with Triton's restricted APIs: inference, health, metadata, model config and statistics need
  `Authorization: Bearer <key>` (HTTP; on gRPC Triton names the metadata key
  `triton-grpc-protocol-authorization`, measured), the key generated here and kept in
  the run folder's key_file.json (TorchServe's layout, so `predict --url` finds it). The model repository,
  shared-memory, trace and logging APIs are restricted to a second key that is never written anywhere:
  loading a model through the repository API can upload and run code. Models are loaded at startup
  (`--model-control-mode=none`), so the repository API cannot load or unload at all. Triton takes the keys
  on its command line only: another user of the machine can read them in the process list (hidepid
  is the operating system's remedy), which docs/serving.md notes.
- Budget headers (X-Max-Iters, X-Tol, ...) are forwarded to the model as request parameters, so the same
  request headers work as on TorchServe and Ray.
- Every process (server and stubs) carries `CRBP_DEPLOY_RUN=<run folder>`; `stop` ends them all.
"""
from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import site
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from ..config import StrictConfig
from ..errors import ConfigError, CrbpError
from .engine import KEY_FILE, Engine, Running, end_processes, http_get, private_log, write_private
from .triton_model import HEADER_PATTERN, SITE_ENV, check_repository

INSTALL = "pip install --no-deps nvidia-pytriton==0.7.0 (part of make setup)"
STATE_FILE = "triton-state.json"
LOG_FILE = "tritonserver.log"
#: Restricted with the inference key (as TorchServe needs its key even for /ping).
KEYED_APIS = "health,metadata,inference,model-config,statistics"
#: Restricted with a key nobody is given: what can load code or read other processes' memory.
CLOSED_APIS = "model-repository,shared-memory,trace,logging"


@dataclass(frozen=True)
class TritonConfig(StrictConfig):
    """A local tritonserver: ports P (HTTP), P+1 (gRPC), P+2 (metrics) on `host`."""

    port: int = 8000
    host: str = "127.0.0.1"
    auth: bool = True
    threads: int = 1  # OMP threads of the model processes (the service's own threads come from its config)
    startup_timeout_s: float = 300.0

    def validate(self) -> None:
        if not 1024 <= self.port <= 65535 - 2:
            raise ConfigError(f"port must be in 1024..65533 (P..P+2 are used), got {self.port}")
        if self.threads < 1 or self.startup_timeout_s <= 0:
            raise ConfigError("threads and startup_timeout_s must be positive")

    def ports(self) -> dict[str, int]:
        return {"http": self.port, "grpc": self.port + 1, "metrics": self.port + 2}


@dataclass
class TritonServer(Running):
    engine: ClassVar[str] = "triton"
    title: ClassVar[str] = "Triton Inference Server"
    pid: int = 0

    def predictions_url(self, model: str) -> str:
        return f"{self.url()}/v2/models/{model}/infer"

    def status(self) -> str:
        return f"pid {self.pid}"

    def links(self) -> list[str]:
        ports = self.config.ports()
        return [f"  gRPC: {self.config.host}:{ports['grpc']}; metrics: http://{self.config.host}:{ports['metrics']}/metrics",
                "  input IMAGE: the image file's bytes as UINT8 [N]; output ANSWER: the JSON answer as UINT8 (KServe v2)"]


def wheel_files() -> dict[str, Path]:
    """The server files of the nvidia-pytriton wheel for this interpreter; CrbpError naming the install step."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise CrbpError(f"the Triton engine needs tritonserver from nvidia-pytriton: {INSTALL}")
    root = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    files = {"binary": root / "bin" / "tritonserver",
             "backend": root / "backends" / "python" / "libtriton_python.so",
             "utils": root / "backends" / "python" / "triton_python_backend_utils.py",
             "stub": root / "python_backend_stubs" / version / "triton_python_backend_stub",
             "libs": root.parent.parent / "nvidia_pytriton.libs"}
    missing = [str(path) for path in files.values() if not path.exists()]
    if missing:
        raise CrbpError(f"the Triton engine misses {', '.join(missing)} (Python {version} stub and server files): {INSTALL}")
    return files


def _joined(*folders) -> str:
    return os.pathsep.join(str(f) for f in folders if f)


def backend_dir(run: Path, files: dict[str, Path]) -> Path:
    """`run/backends/python/`: the Python backend with this interpreter's stub (Triton looks for it there)."""
    folder = run / "backends" / "python"
    shutil.rmtree(folder.parent, ignore_errors=True)
    folder.mkdir(parents=True)
    for key in ("backend", "utils", "stub"):
        shutil.copy2(files[key], folder / files[key].name)
    return folder.parent


def server_args(files: dict[str, Path], repo: Path, backends: Path, config: TritonConfig, token: str | None) -> list[str]:
    ports = config.ports()
    args = [str(files["binary"]), f"--model-repository={repo}", f"--backend-directory={backends}",
            "--model-control-mode=none", "--strict-readiness=true", "--exit-on-error=true",
            f"--http-address={config.host}", f"--http-port={ports['http']}",
            f"--grpc-address={config.host}", f"--grpc-port={ports['grpc']}",
            f"--metrics-address={config.host}", f"--metrics-port={ports['metrics']}",
            "--allow-sagemaker=false", "--allow-vertex-ai=false", "--allow-gpu-metrics=false",
            f"--http-header-forward-pattern={HEADER_PATTERN}", f"--grpc-header-forward-pattern={HEADER_PATTERN}"]
    closed = secrets.token_urlsafe(24)  # never stored: these APIs stay shut for everybody
    args += [f"--http-restricted-api={CLOSED_APIS}:Authorization=Bearer {closed}",
             f"--grpc-restricted-protocol={CLOSED_APIS}:authorization=Bearer {closed}"]
    if token:
        args += [f"--http-restricted-api={KEYED_APIS}:Authorization=Bearer {token}",
                 f"--grpc-restricted-protocol={KEYED_APIS}:authorization=Bearer {token}"]
    return args


def _log_error(run: Path) -> str:
    """The last error line of the server's log (Triton prefixes them with E), or its last lines."""
    try:
        lines = [ln.strip() for ln in (run / LOG_FILE).read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    noise = ("cuda", "nvml", "dcgm", "pinned", "gpu")
    errors = [ln for ln in lines if ln[:1] == "E" and not any(n in ln.lower() for n in noise)]
    return (errors or lines or ["no output"])[-1][:600]


class Triton(Engine):
    """tritonserver on one machine, serving a Triton model repository (package --format triton)."""

    name = "triton"
    noun = "Triton server"
    stopped = "stopped Triton (pid {pid}); the server and its model processes have exited"
    gone = "Triton exited on its own; see {logs}"
    requires = ()
    install = f"the Triton engine needs tritonserver from nvidia-pytriton: {INSTALL}"
    store_noun = "Triton model repository"
    build_hint = "crbp-deploy package --format triton --out REPO"

    def check_installed(self) -> None:
        wheel_files()

    def models_in(self, store) -> list[str]:
        return check_repository(store)

    def configure(self, port: int, auth: bool = True, replicas: int | None = None) -> TritonConfig:
        if replicas is not None:
            raise CrbpError("--replicas is for --engine ray; a Triton model's instances are set in its config.pbtxt")
        return TritonConfig(port=port, auth=auth)

    def running(self, run_dir) -> int | None:
        procs = [p for p in self.processes(run_dir) if _name(p) == "tritonserver"]
        return min(p.pid for p in procs) if procs else None

    def log_dir(self, run_dir) -> Path:
        return Path(run_dir)

    def start(self, model_store, config: TritonConfig | None = None, *, run_dir=None, models=None,
              progress=None) -> TritonServer:
        """Start tritonserver on 127.0.0.1 and return once every model of the repository is ready; on
        failure the server is stopped and the error names the log's last error line."""
        config = config or TritonConfig()
        say = progress or (lambda msg: None)
        repo, served, run = self.prepare(model_store, config, run_dir, models)
        if set(served) != set(self.models_in(repo)):
            raise CrbpError("the Triton engine serves every model of the repository; give it one with only those")
        files = wheel_files()
        (run / KEY_FILE).unlink(missing_ok=True)
        token = secrets.token_urlsafe(12) if config.auth else None
        if token:
            write_private(run / KEY_FILE, json.dumps({"inference": {"key": token}}))
        backends = backend_dir(run, files)
        sites = os.pathsep.join(site.getsitepackages())
        env = self.environment(run, {SITE_ENV: sites, "OMP_NUM_THREADS": str(config.threads),
                                     "LD_LIBRARY_PATH": _joined(files["libs"], os.environ.get("LD_LIBRARY_PATH")),
                                     # the stub's embedded Python finds its prefix from `python3` on PATH: this
                                     # interpreter's (the venv's, with numpy), not a shim's or the system's
                                     "PATH": _joined(Path(sys.executable).parent, os.environ.get("PATH"))})
        say(f"starting tritonserver on {config.host}:{config.port} (run folder {run})")
        with private_log(run / LOG_FILE) as log:
            proc = subprocess.Popen(server_args(files, repo, backends, config, token), cwd=run, env=env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True, umask=0o077)
        write_private(run / STATE_FILE, json.dumps({"engine": "triton", "pid": proc.pid, "port": config.port, "models": served}))
        server = TritonServer(run, config, served, {"inference": token} if token else {}, pid=proc.pid)
        try:
            self._wait_ready(server, proc, say)
        except BaseException:
            self.stop(run)
            raise
        return server

    def _wait_ready(self, server: TritonServer, proc: subprocess.Popen, say) -> None:
        deadline = time.monotonic() + server.config.startup_timeout_s
        say(f"loading {', '.join(server.models)}")
        while True:
            if proc.poll() is not None:
                raise CrbpError(f"tritonserver exited during startup (code {proc.returncode}): {_log_error(server.run_dir)} "
                                f"(log: {server.run_dir / LOG_FILE})")
            if time.monotonic() > deadline:
                raise CrbpError(f"Triton was not ready within {server.config.startup_timeout_s:.0f} s: "
                                f"{_log_error(server.run_dir)} (log: {server.run_dir / LOG_FILE})")
            try:
                if http_get(f"{server.url()}/v2/health/ready", server.token, timeout=2.0)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.3)

    def stop(self, run_dir, timeout: float | None = None) -> bool:
        """SIGTERM the server (it unloads its models, which finish the requests in hand), then its model
        processes; SIGKILL what is alive after `timeout` (default 30 s). False if none was running."""
        run = Path(run_dir)
        procs = self.processes(run)
        had_state = (run / STATE_FILE).exists()
        server = [p for p in procs if _name(p) == "tritonserver"]
        end_processes(server, 30.0 if timeout is None else timeout)
        end_processes(self.processes(run), 15.0)
        left = self.processes(run)
        if left:
            raise CrbpError(f"processes of the Triton server in {run} survived SIGKILL: {sorted(p.pid for p in left)}")
        for name in (STATE_FILE, KEY_FILE):
            (run / name).unlink(missing_ok=True)
        return bool(procs) or had_state


def _name(proc) -> str:
    try:
        return proc.name()
    except Exception:  # noqa: BLE001 - gone
        return ""
