"""TorchServe `.mar` archives: the exported model, its card, the handler and this package, in one file.

What goes in (and why):
- the model: an early-exit ONNX export (`--format onnx`, the default: exported here with
  `export_onnx(strategy="loop")` when given a checkpoint) or the checkpoint itself (`--format
  checkpoint`); the ONNX sidecar carries the model card (categories, budget, post-processing). A panoptic
  model or a Pathfinder-task one (answered with one `contour` category, serving/mask.py); a checkpoint of
  the paper's public code (`.pth.tar`) is mapped by `checkpoint.load` and packaged like the project's own;
- `handlers/panoptic_handler.py`, TorchServe's entry point;
- the `crbp_deploy` package sources (`.py` only): TorchServe puts the unpacked archive first on
  the worker's sys.path, so a served archive runs exactly the code it was packaged with, whatever
  version is installed beside the server (torch, numpy, pillow and onnxruntime must be installed;
  requirements.txt lists onnxruntime for `install_py_dep_per_model`, as on KServe);
- model-config.yaml: TorchServe's per-model settings (workers, batchSize, maxBatchDelay,
  responseTimeout) plus a `handler:` section read by the handler (ServiceConfig).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..artifact import read_card, read_sidecar, sidecar_path
from ..config import StrictConfig
from ..errors import ConfigError, CrbpError, InputError
from ..modelcard import ModelCard
from .service import ServiceConfig, check_servable, served_task

FORMATS = ("onnx", "checkpoint")
DEFAULT_NAME = "crbp-panoptic"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class ArchiveConfig(StrictConfig):
    """TorchServe's per-model settings, written to the archive's model-config.yaml."""

    workers: int = 1
    batch_size: int = 8
    max_batch_delay_ms: int = 10
    response_timeout_s: int = 120
    version: str = "1.0"

    def validate(self) -> None:
        if self.workers < 1 or self.batch_size < 1 or self.max_batch_delay_ms < 0 or self.response_timeout_s < 1:
            raise ConfigError(
                "workers, batch_size and response_timeout_s must be >= 1 and max_batch_delay_ms >= 0, "
                f"got {self.to_dict()}"
            )


@dataclass
class PackageResult:
    path: Path
    name: str
    format: str
    model_file: str
    source: str
    size_bytes: int
    config: ArchiveConfig
    service: ServiceConfig
    export: dict[str, Any] | None = None
    files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "name": self.name,
            "format": self.format,
            "model_file": self.model_file,
            "source": self.source,
            "size_bytes": self.size_bytes,
            "torchserve": model_config(self.config, self.service),
            "export": self.export,
        }


def check_name(name: str) -> str:
    """A model name TorchServe and Triton accept (torch-model-archiver's own rule)."""
    if not NAME_RE.match(name):
        raise InputError(f"model name {name!r} must start with a letter or digit and use only letters, digits, _ . - "
                         "(give one with --name)")
    return name


def default_handler() -> Path:
    """handlers/panoptic_handler.py of the source tree this package was imported from."""
    import crbp_deploy

    return Path(crbp_deploy.__file__).resolve().parent.parent / "handlers" / "panoptic_handler.py"


def model_config(config: ArchiveConfig, service: ServiceConfig) -> dict[str, Any]:
    return {
        "minWorkers": config.workers,
        "maxWorkers": config.workers,
        "batchSize": config.batch_size,
        "maxBatchDelay": config.max_batch_delay_ms,
        "responseTimeout": config.response_timeout_s,
        "handler": service.to_dict(),
    }


def copy_package(target: Path) -> Path:
    """The crbp_deploy sources (.py files only: no weights, no caches) under `target/crbp_deploy`."""
    import crbp_deploy

    source = Path(crbp_deploy.__file__).resolve().parent
    dest = target / "crbp_deploy"
    for path in sorted(source.rglob("*.py")):
        rel = path.relative_to(source)
        if "__pycache__" in rel.parts:
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest / rel)
    return dest


def _requirements(fmt: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    if fmt != "onnx":
        return ""
    try:
        return f"onnxruntime=={version('onnxruntime')}\n"
    except PackageNotFoundError:
        return "onnxruntime\n"


def _check_limit(service: ServiceConfig, card: ModelCard) -> None:
    """Fail at packaging time, not in a server worker, when the limit is below the model's default budget."""
    default = card.budget.max_iters
    if default is not None and default > service.max_iters_limit:
        raise ConfigError(
            f"max_iters_limit={service.max_iters_limit} is below the model's default max_iters={default}; raise it"
        )


def check_deadline(service: ServiceConfig, config: ArchiveConfig) -> None:
    """The per-request deadline must sit well inside TorchServe's response timeout: a batch waits behind at
    most one batch in its worker and every request of a batch ends by its deadline, so a deadline of a
    quarter of the timeout leaves the timeout (which kills the worker) unreachable with room to spare."""
    if service.deadline_ms > config.response_timeout_s * 1000 / 4:
        raise ConfigError(
            f"deadline_ms={service.deadline_ms} is not well inside response_timeout_s={config.response_timeout_s} "
            f"(at most a quarter of it, {config.response_timeout_s * 250} ms): lower the deadline or raise the timeout"
        )


def _stage_model(file: Path, kind: str, fmt: str, name: str, source: str, stage: Path, extra: Path,
                 say: Callable[[str], None]) -> tuple[Path, ModelCard, dict[str, Any] | None]:
    """Put the model file in `stage` (and its sidecar in `extra`): an ONNX export as it is, a checkpoint
    exported to ONNX (`fmt` onnx) or copied. Returns (model file, card, export info or None)."""
    from ..export.pieces import pieces_dir

    if kind == "onnx":
        sidecar = read_sidecar(file)
        card = read_card(file)
        if card is None:
            raise CrbpError(f"{file}: its sidecar {sidecar_path(file).name} with the model card (categories) is missing")
        check_servable(served_task((sidecar.get("model") or {}).get("architecture", "")), card, str(file))
        if sidecar.get("strategy") != "loop":
            raise CrbpError(f"{file} is a fixed-count ({sidecar.get('strategy')}) export; serve an early-exit (loop) export")
        model_file = stage / f"{name}.onnx"
        shutil.copy2(file, model_file)
        shutil.copy2(sidecar_path(file), extra / f"{model_file.name}.json")
        if pieces_dir(file).is_dir():  # what the Ray engine's iteration-level scheduler steps
            shutil.copytree(pieces_dir(file), extra / pieces_dir(model_file).name)
        return model_file, card, None
    from .. import checkpoint
    from ..export import export_onnx

    obj = checkpoint.load(file)
    card = ModelCard.of(obj)
    check_servable(served_task(obj.arch), card, source)
    if fmt != "onnx":
        model_file = stage / f"{name}.pt"
        shutil.copy2(file, model_file)
        return model_file, card, None
    budget = card.budget.early()
    say(f"exporting {source} to ONNX (early-exit loop, max_iters={budget.max_iters}, tol={budget.tol})")
    model_file = stage / f"{name}.onnx"
    result = export_onnx(obj, model_file, strategy="loop", pieces=True, source=source, **budget.kwargs())
    shutil.move(str(result.sidecar), extra / f"{model_file.name}.json")
    shutil.move(str(pieces_dir(model_file)), extra / pieces_dir(model_file).name)
    return model_file, card, result.to_dict()


def package(
    model: str | os.PathLike | None = None,
    *,
    name: str | None = None,
    out: str | os.PathLike = "model_store",
    fmt: str = "onnx",
    config: ArchiveConfig | None = None,
    service: ServiceConfig | None = None,
    handler: str | os.PathLike | None = None,
    progress: Callable[[str], None] | None = None,
) -> PackageResult:
    """Build `out/NAME.mar` from an early-exit `.onnx` export, a checkpoint or a bundled model name
    (default: the bundled model, packaged as `crbp-panoptic`)."""
    from ..sources import resolve

    say = progress or (lambda msg: None)
    config = config or ArchiveConfig()
    service = service or ServiceConfig()
    check_deadline(service, config)
    if fmt not in FORMATS:
        raise InputError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    handler_path = Path(handler) if handler else default_handler()
    if not handler_path.is_file():
        raise CrbpError(f"handler {handler_path} not found; it ships with the source tree (give --handler PATH)")
    src = resolve(model)
    if src.kind not in ("onnx", "checkpoint", "bundled"):
        raise InputError(f"{src.label} is not an .onnx export, a checkpoint or a bundled model")
    if not src.path.is_file():
        raise InputError(f"{src.path}: no such {'ONNX' if src.kind == 'onnx' else 'checkpoint'} file")
    kind, file, source = "onnx" if src.kind == "onnx" else "checkpoint", src.path, src.label
    name = name or (DEFAULT_NAME if source == f"bundled:{DEFAULT_NAME}" else src.name)
    check_name(name)
    if kind == "onnx" and fmt == "checkpoint":
        raise InputError(f"{source} is already an ONNX export; --format checkpoint needs a .pt checkpoint")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="crbp-mar-") as tmp:
        stage, extra = Path(tmp), Path(tmp) / "extra"
        extra.mkdir()
        model_file, card, export_info = _stage_model(file, kind, fmt, name, source, stage, extra, say)
        _check_limit(service, read_card(extra / model_file.name) if kind == "onnx" or fmt == "onnx" else card)
        copy_package(extra)
        import yaml

        (stage / "model-config.yaml").write_text(yaml.safe_dump(model_config(config, service), sort_keys=False))
        requirements = _requirements(fmt)
        args = [
            sys.executable, "-m", "model_archiver.model_packaging",
            "--model-name", name, "--version", config.version,
            "--handler", str(handler_path), "--serialized-file", str(model_file),
            "--extra-files", str(extra), "--config-file", str(stage / "model-config.yaml"),
            "--export-path", str(out), "--force",
        ]
        if requirements:
            (stage / "requirements.txt").write_text(requirements)
            args += ["--requirements-file", str(stage / "requirements.txt")]
        say(f"archiving {name}.mar with torch-model-archiver")
        done = subprocess.run(args, capture_output=True, text=True)
        if done.returncode != 0:
            raise CrbpError(f"torch-model-archiver failed: {(done.stderr or done.stdout).strip()[-800:]}")
        files = sorted(str(p.relative_to(extra)) for p in extra.rglob("*") if p.is_file())
    path = out / f"{name}.mar"
    if not path.is_file():
        raise CrbpError(f"torch-model-archiver reported success but {path} is missing")
    return PackageResult(
        path=path, name=name, format=fmt, model_file=model_file.name, source=source, size_bytes=path.stat().st_size,
        config=config, service=service, export=export_info,
        files=[model_file.name, handler_path.name, "model-config.yaml", *files],
    )
