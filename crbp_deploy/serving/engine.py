"""One `Engine` interface over the servers this project starts (TorchServe, Ray Serve, Triton), so
`serve`, `demo` and the tests start, find and stop a server without knowing which engine runs it.

A base class rather than a bare Protocol because the engines share more than names: the `.mar` store, a run
folder per engine and port, TorchServe's key file layout (`predict --url` finds either token), the refusals
before starting, the /ping probe, and how a server's processes are found and ended. A new engine adds
`configure`, `start`, `stop`, `running`, `log_dir`, and one line in `ENGINES`; an engine that serves
something else than a folder of `.mar` archives (Triton: a model repository) also `models_in`.

Every process a server starts carries `CRBP_DEPLOY_RUN=<run folder>` in its environment (children inherit
it, a daemon reparented to pid 1 keeps it), so `processes(run)` finds all of them and `stop` ends all of
them; `listening(run)` lists their listening sockets (the lockdown tests assert they are all on loopback).
"""
from __future__ import annotations

import importlib
import ipaddress
import json
import os
import socket
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..errors import CrbpError, InputError

#: --engine name -> "module:class"; imported on use, so the CLI loads only the engine it runs.
ENGINES = {"torchserve": "crbp_deploy.serving.server:TorchServe", "ray": "crbp_deploy.serving.ray_engine:RayServe",
           "triton": "crbp_deploy.serving.triton_engine:Triton"}
DEFAULT_ENGINE = "torchserve"
STATE_ENV = "CRBP_DEPLOY_STATE"
KEY_FILE = "key_file.json"
RUN_ENV = "CRBP_DEPLOY_RUN"  # set to the run folder in the environment of every process a server starts


def get_engine(name: str) -> Engine:
    """The engine called `name` (a key of ENGINES); an InputError names the valid ones."""
    if name not in ENGINES:
        raise InputError(f"--engine must be one of {', '.join(ENGINES)}, got {name!r}")
    module, cls = ENGINES[name].split(":")
    return getattr(importlib.import_module(module), cls)()


def read_keys(run_dir: str | os.PathLike) -> dict[str, str]:
    """{"inference", "management", "API"} keys from the run folder's key_file.json ({} if none)."""
    try:
        doc = json.loads((Path(run_dir) / KEY_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return {name: entry["key"] for name, entry in doc.items() if isinstance(entry, dict) and "key" in entry}


def http_get(url: str, token: str | None, timeout: float = 5.0) -> tuple[int, Any]:
    """(status, JSON body or text) of a GET; an HTTP error status is an answer, not an exception."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        return status, json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return status, raw.decode("utf-8", "replace")


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def store_models(model_store: str | os.PathLike) -> list[str]:
    return sorted(p.stem for p in Path(model_store).glob("*.mar"))


def private_dir(path: str | os.PathLike) -> Path:
    """`path` as a folder only its owner can enter (mode 700): keys, logs, sockets and temp files live below."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path` with mode 600, replacing it at once (a reader never sees half a key file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def private_log(path: Path):
    """`path` opened for writing (binary, truncated) with mode 600, for a launcher's output."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "wb")


def marked_processes(run_dir: str | os.PathLike) -> list:
    """The live processes (psutil) whose environment says they belong to the server of `run_dir`, and
    their children; never this process."""
    import psutil

    tag = str(Path(run_dir).resolve())
    found = {}
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and proc.environ().get(RUN_ENV) == tag:
                found[proc.pid] = proc
        except psutil.Error:
            continue
    return with_children(found.values())


def with_children(procs) -> list:
    """`procs` and all their live descendants (zombies left out), each once; never this process."""
    import psutil

    found = {}
    for proc in procs:
        try:
            for p in [proc, *proc.children(recursive=True)]:
                if p.pid != os.getpid() and p.status() != psutil.STATUS_ZOMBIE:
                    found.setdefault(p.pid, p)
        except psutil.Error:
            continue
    return list(found.values())


def end_processes(procs, timeout: float) -> None:
    """SIGTERM `procs`, SIGKILL the ones alive after `timeout` s, and wait until all have exited."""
    import psutil

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


def is_loopback(ip: str) -> bool:
    """127.0.0.0/8 and ::1, also written as an IPv4-mapped IPv6 address (::ffff:127.0.0.1)."""
    try:
        addr = ipaddress.ip_address(ip.split("%")[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def listening_sockets(procs) -> list[tuple[str, int, int, str]]:
    """(address, port, pid, process name) of every TCP/UDP socket `procs` listen on (TCP LISTEN, bound UDP)."""
    import psutil

    out = set()
    for proc in procs:
        try:
            name = proc.name()
            for conn in proc.net_connections(kind="inet"):
                if conn.laddr and (conn.status == psutil.CONN_LISTEN or (conn.type == socket.SOCK_DGRAM and not conn.raddr)):
                    out.add((conn.laddr.ip, conn.laddr.port, proc.pid, name))
        except psutil.Error:
            continue
    return sorted(out, key=lambda s: (s[1], s[0]))


@dataclass
class Running:
    """A server an engine started: where it answers, its keys, how to stop it. Subclasses add `status()`
    (what follows "is up" in parentheses: pid, replicas) and `links()` (lines after the prediction URLs)."""

    engine: ClassVar[str]  # the ENGINES name of the engine that started it
    title: ClassVar[str]  # "TorchServe", "Ray Serve": the first line `serve` prints
    run_dir: Path
    config: Any  # the engine's config (host, port, auth, ...)
    models: list[str]
    keys: dict[str, str] = field(default_factory=dict)

    def url(self) -> str:
        return f"http://{self.config.host}:{self.config.port}"

    def predictions_url(self, model: str) -> str:
        return f"{self.url()}/predictions/{model}"

    @property
    def token(self) -> str | None:
        return self.keys.get("inference")

    @property
    def key_file(self) -> Path | None:
        return self.run_dir / KEY_FILE if self.config.auth else None

    def summary(self) -> list[str]:
        """What `serve` prints once the server is up."""
        head = f"{self.title} is up ({self.status()}), serving {', '.join(self.models)}"
        return [head, *(f"  predictions: {self.predictions_url(m)}" for m in self.models), *self.links()]

    def stop(self, timeout: float | None = None) -> bool:
        return get_engine(self.engine).stop(self.run_dir, timeout)


class Engine(ABC):
    """A server engine. Instances hold no state: a server is found again from its run folder."""

    name: ClassVar[str]  # the --engine value; also the run folder's prefix
    noun: ClassVar[str]  # "no {noun} started by crbp-deploy is running", "a {noun} from RUN is already running"
    stopped: ClassVar[str]  # what `serve --stop` says; {pid} is the stopped server's pid
    gone: ClassVar[str]  # what `serve --foreground` says when the server dies; {logs} is log_dir(run)
    requires: ClassVar[tuple[tuple[str, str], ...]]  # (module to import, pip package)
    install: ClassVar[str]  # the error when one is missing; {missing} lists the packages
    store_noun: ClassVar[str] = "model store"  # what --model-store names for this engine
    build_hint: ClassVar[str] = "crbp-deploy package"  # how to build one

    def models_in(self, store: Path) -> list[str]:
        """The model names `store` offers (default: its .mar archives)."""
        return store_models(store)

    def default_run_dir(self, port: int) -> Path:
        """Where `crbp-deploy serve --port P` keeps its files: $CRBP_DEPLOY_STATE or ~/.cache/crbp-deploy."""
        base = Path(os.environ.get(STATE_ENV) or Path.home() / ".cache" / "crbp-deploy")
        return base / f"{self.name}-{port}"

    def check_installed(self) -> None:
        """Raise a one-line CrbpError naming what to pip install (imports, so a broken install counts)."""
        missing = []
        for module, package in self.requires:
            try:
                importlib.import_module(module)
            except ImportError:
                missing.append(package)
        if missing:
            raise CrbpError(self.install.format(missing=", ".join(missing)))

    def prepare(self, model_store, config, run_dir, models) -> tuple[Path, list[str], Path]:
        """Checks every engine makes before starting anything: (store, models, run folder)."""
        self.check_installed()
        store = Path(model_store).resolve()
        if not store.is_dir():
            raise CrbpError(f"{self.store_noun} {store} does not exist; build one first: {self.build_hint}")
        available = self.models_in(store)
        models = list(models) if models is not None else available
        if not models:
            what = ".mar archives" if self.store_noun == "model store" else "models"
            raise CrbpError(f"no {what} in {store}; build one first: {self.build_hint}")
        missing = sorted(set(models) - set(available))
        if missing:
            found = ", ".join(available) or "none"
            raise CrbpError(f"not in {store}: {', '.join(missing)} (found: {found})")
        run = private_dir(Path(run_dir or self.default_run_dir(config.port)).resolve())
        live = self.running(run)
        if live:
            raise CrbpError(f"a {self.noun} from {run} is already running (pid {live}); "
                            f"stop it: crbp-deploy serve --stop --port {config.port}")
        busy = [f"{name} {port}" for name, port in config.ports().items() if not port_free(config.host, port)]
        if busy:
            raise CrbpError(f"port(s) in use on {config.host}: {', '.join(busy)}; choose another --port")
        return store, models, run

    @abstractmethod
    def configure(self, port: int, auth: bool = True, replicas: int | None = None) -> Any:
        """The engine's config from `serve`'s options; an option it has no use for is an error."""

    @abstractmethod
    def start(self, model_store, config=None, *, run_dir=None, models=None, progress=None) -> Running:
        """Start a server on 127.0.0.1 and return once every model answers; on failure nothing is left running."""

    @abstractmethod
    def stop(self, run_dir, timeout: float | None = None) -> bool:
        """Stop the server started from `run_dir` and wait until its processes are gone; False if none was."""

    @abstractmethod
    def running(self, run_dir) -> int | None:
        """The pid of the live server started from `run_dir`, or None."""

    @abstractmethod
    def log_dir(self, run_dir) -> Path:
        """Where the server started from `run_dir` writes its logs."""

    def processes(self, run_dir) -> list:
        """Every live process of the server started from `run_dir` (psutil), found by its environment."""
        return marked_processes(run_dir)

    def listening(self, run_dir) -> list[tuple[str, int, int, str]]:
        """(address, port, pid, name) of every socket the server's processes listen on."""
        return listening_sockets(self.processes(run_dir))

    def environment(self, run: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The server's environment: this process's, `extra`, and the run folder marker."""
        return {**os.environ, **(extra or {}), RUN_ENV: str(Path(run).resolve())}
