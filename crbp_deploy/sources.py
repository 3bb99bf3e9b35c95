"""One resolver for every way to name a model: a checkpoint file, a bundled model's name, a registered
architecture (random weights), an exported .onnx artifact or a TensorRT engine.

The CLI, `serving.archive.package` and `runtime.load_backend` all resolve through `resolve`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .artifact import ENGINE_SUFFIXES, ONNX_SUFFIX
from .errors import CrbpError, InputError

KINDS = ("checkpoint", "bundled", "registry", "onnx", "engine")
#: Checkpoint file names: the project's `.pt`, and `.pth` / `.pth.tar` as the paper's public code names its files.
CHECKPOINT_SUFFIXES = (".pth.tar", ".pth", ".pt")


def checkpoint_stem(path: Path) -> str:
    """A checkpoint's name without its checkpoint suffix (`x.pth.tar` -> `x`, a valid model name), else the stem."""
    suffix = next((s for s in CHECKPOINT_SUFFIXES if path.name.endswith(s) and path.name != s), None)
    return path.name[: -len(suffix)] if suffix else path.stem


@dataclass(frozen=True)
class Source:
    kind: str  # one of KINDS
    path: Path | None  # the file (None for a registered architecture)
    label: str  # how results name it: the path, bundled:NAME or registry:NAME
    name: str  # a default model name: the file stem or the bundled / registered name

    def load_model(self):
        """The PyTorch model (eval mode, card on `.meta`); exported artifacts have none."""
        from . import checkpoint
        from .models import create_model

        if self.kind in ("onnx", "engine"):
            raise CrbpError(f"{self.label} is an exported {self.kind} artifact, not a checkpoint; give the model it came from")
        return create_model(self.name) if self.kind == "registry" else checkpoint.load(self.path)


def resolve(spec: str | os.PathLike | None) -> Source:
    """What `spec` names (default: the bundled model); InputError listing the choices when nothing fits."""
    from . import zoo
    from .models import list_models

    text = zoo.DEFAULT if spec is None else str(spec)
    path = Path(text)
    if path.suffix == ONNX_SUFFIX:
        return Source("onnx", path, text, path.stem)
    if path.suffix in ENGINE_SUFFIXES:
        return Source("engine", path, text, path.stem)
    if path.name.endswith(CHECKPOINT_SUFFIXES) or path.exists():
        return Source("checkpoint", path, text, checkpoint_stem(path))
    if text in zoo.names():
        return Source("bundled", zoo.path(text), f"bundled:{text}", text)
    if text in list_models():
        return Source("registry", None, f"registry:{text}", text)
    raise InputError(
        f"{text!r} is not a checkpoint file, an export ({ONNX_SUFFIX}, {', '.join(ENGINE_SUFFIXES)}), a bundled model "
        f"({', '.join(zoo.names()) or 'none'}) or a registered architecture ({', '.join(list_models())}): "
        f"unknown artifact type {path.suffix or '(no suffix)'}"
    )


def resolve_model(spec: str | os.PathLike | None):
    """(model, label) for a checkpoint file, a bundled model's name or a registered architecture."""
    source = resolve(spec)
    return source.load_model(), source.label
