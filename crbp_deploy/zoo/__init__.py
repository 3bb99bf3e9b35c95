"""Bundled checkpoints, shipped inside the package (no downloads at run time)."""
from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError

DEFAULT = "crbp-panoptic"
_HERE = Path(__file__).parent


def names() -> list[str]:
    return sorted(p.stem for p in _HERE.glob("*.pt"))


def path(name: str = DEFAULT) -> Path:
    """The checkpoint file of a bundled model."""
    file = _HERE / f"{name}.pt"
    if not file.is_file():
        raise CheckpointError(f"no bundled model named {name!r}; bundled: {', '.join(names()) or 'none'}")
    return file


def load(name: str = DEFAULT):
    """The bundled model, in eval mode, with its metadata on `.meta`."""
    from .. import checkpoint

    return checkpoint.load(path(name))
