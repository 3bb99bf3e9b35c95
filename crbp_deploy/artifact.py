"""The artifact format: what an exported model says about itself, written by the exporter, read by
every backend and by serving (neither needs the exporter).

An ONNX artifact describes itself twice: `metadata_props` in the .onnx (`ArtifactMeta`, all a
runtime needs) and a JSON sidecar `<name>.onnx.json` (model card, I/O schema, defaults,
verification). A TensorRT engine has only its sidecar, which holds the same `metadata_props`.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .budget import Budget
from .errors import CrbpError, InputError
from .modelcard import ModelCard

STRATEGIES = ("loop", "unrolled")
ONNX_SUFFIX = ".onnx"
ENGINE_SUFFIXES = (".engine", ".plan")
SIDECAR_FORMAT = "crbp-deploy/onnx-artifact"
SIDECAR_VERSION = 1
ENGINE_FORMAT = "crbp-deploy/tensorrt-engine"
ENGINE_VERSION = 1
META_PREFIX = "crbp_deploy."
BUDGET_INPUTS = ("max_iters", "tol", "threshold", "patience")  # loop artifacts: graph inputs holding the default budget


@dataclass(frozen=True)
class ArtifactMeta:
    """What a runtime must know about an artifact; stored in the .onnx `metadata_props`.

    New fields need a default (older artifacts lack them) and JSON-serialisable values.
    """

    strategy: str
    heads: tuple[str, ...]
    in_channels: int
    size_multiple: int = 1
    iters: int | None = None  # unrolled
    max_iters: int | None = None  # loop defaults
    tol: float | None = None
    substeps: int = 1
    arch: str = ""
    execution: str = "masked"  # loop body: "compact" or "masked" (solver.EXECUTIONS); older artifacts are masked
    precision: str = "fp32"  # "fp16": float math in fp16, I/O and the convergence test fp32 (export --fp16)
    policy: str = "tol"  # the halting policy computed in the Loop body (models/halting.py); older artifacts: tol
    threshold: float | None = None  # its default (a graph input, like tol)
    patience: int = 1

    @property
    def budget(self) -> Budget:
        """The artifact's default budget: its fixed count, or its loop's defaults."""
        if self.strategy == "unrolled":
            return Budget(iters=self.iters)
        return Budget(max_iters=self.max_iters, tol=self.tol, policy=self.policy, threshold=self.threshold,
                      patience=self.patience)

    def to_props(self) -> dict[str, str]:
        return {META_PREFIX + k: json.dumps(v) for k, v in asdict(self).items()}

    @classmethod
    def from_props(cls, props: dict[str, str], where: str = "artifact") -> "ArtifactMeta":
        values = {k[len(META_PREFIX):]: v for k, v in props.items() if k.startswith(META_PREFIX)}
        if "strategy" not in values:
            raise CrbpError(f"{where}: not a crbp-deploy ONNX export (no {META_PREFIX}strategy metadata)")
        try:
            data = {k: json.loads(v) for k, v in values.items() if k in cls.__dataclass_fields__}
            data["heads"] = tuple(data.get("heads", ()))
            meta = cls(**data)
        except (TypeError, ValueError) as exc:
            raise CrbpError(f"{where}: unreadable crbp-deploy metadata ({exc})") from None
        if meta.strategy not in STRATEGIES:
            raise CrbpError(f"{where}: unknown strategy {meta.strategy!r} (this crbp-deploy knows {', '.join(STRATEGIES)})")
        return meta


def sidecar_path(path: str | os.PathLike) -> Path:
    """`model.onnx` -> `model.onnx.json`."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def check_writable(path: Path) -> None:
    """Fail before the (slow) export when the output cannot be written at all."""
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise InputError(f"cannot write {path}: {folder} is not a directory")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"cannot write {path}: {folder} is not writable")
    if path.is_dir():
        raise InputError(f"cannot write {path}: it is a directory")


def write_atomic(items: list[tuple[Path, bytes]]) -> None:
    """Write every file to a temp name first, then rename them all: nothing half-written remains."""
    temps: list[tuple[str, Path]] = []
    umask = os.umask(0)
    os.umask(umask)
    try:
        for target, data in items:
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
            except OSError as exc:
                raise InputError(f"cannot write {target}: {exc.strerror or exc}") from None
            temps.append((tmp, target))
            os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; a model file is as shareable as any other
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        for tmp, target in temps:
            os.replace(tmp, target)
    except BaseException:
        for tmp, _ in temps:
            Path(tmp).unlink(missing_ok=True)
        raise


def sidecar_bytes(sidecar: dict[str, Any]) -> bytes:
    return (json.dumps(sidecar, indent=2, allow_nan=True) + "\n").encode()


def write_sidecar(path: str | os.PathLike, sidecar: dict[str, Any]) -> Path:
    """(Re)write the JSON sidecar of an artifact atomically."""
    target = sidecar_path(path)
    write_atomic([(target, sidecar_bytes(sidecar))])
    return target


def read_sidecar(path: str | os.PathLike) -> dict[str, Any] | None:
    target = sidecar_path(path)
    if not target.exists():
        return None
    try:
        return json.loads(target.read_text())
    except (OSError, ValueError) as exc:
        raise CrbpError(f"{target}: unreadable sidecar JSON ({exc})") from None


def read_card(path: str | os.PathLike) -> ModelCard | None:
    """The model card in an artifact's sidecar; None when there is no sidecar."""
    sidecar = read_sidecar(path)
    return None if sidecar is None else ModelCard.of((sidecar.get("model") or {}).get("meta"))


def read_engine_sidecar(engine_path: str | os.PathLike) -> dict[str, Any]:
    """The sidecar `build_engine` wrote next to an engine, checked for format."""
    path = Path(engine_path)
    sidecar = read_sidecar(path)
    if sidecar is None:
        raise CrbpError(f"{path}: no sidecar {sidecar_path(path).name}; crbp-deploy needs the one build_engine writes")
    if sidecar.get("format") != ENGINE_FORMAT:
        raise CrbpError(f"{sidecar_path(path)}: not a crbp-deploy TensorRT engine sidecar (format {sidecar.get('format')!r})")
    if int(sidecar.get("version", 0)) > ENGINE_VERSION:
        raise CrbpError(f"{sidecar_path(path)}: sidecar version {sidecar.get('version')} is newer than this crbp-deploy reads")
    return sidecar
