"""Self-describing checkpoints: one `.pt` with architecture, config, weights and metadata.

Files are read with `torch.load(weights_only=True)`, so nothing in them is ever executed;
every way a file can be wrong becomes a one-line `CheckpointError` naming the problem.
"""
from __future__ import annotations

import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, ConfigError
from .models import RecurrentSegmenter, get_entry

FORMAT = "crbp-deploy/checkpoint"
VERSION = 1


def _check_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """Metadata must be plain JSON so it loads safely and prints in model cards."""
    try:
        return json.loads(json.dumps(meta, allow_nan=True))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint metadata must be JSON-serialisable: {exc}") from None


def save(model: RecurrentSegmenter, path: str | os.PathLike, meta: dict[str, Any] | None = None) -> Path:
    """Write atomically (temp file + rename): a crash never leaves a half-written checkpoint."""
    if not getattr(model, "arch", ""):
        raise CheckpointError(f"{type(model).__name__} is not a registered model; cannot save it")
    path = Path(path)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "arch": model.arch,
        "config": model.config.to_dict(),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "meta": _check_meta(meta or {}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; a checkpoint is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read(path: str | os.PathLike) -> dict[str, Any]:
    """The raw checkpoint dict, validated; never unpickles code."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: file is empty (0 bytes)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        code = next((line for line in lines if "global" in line.lower()), None)
        if code is None:
            raise CheckpointError(f"{path}: not a checkpoint file ({lines[0] if lines else 'unreadable pickle'})") from None
        raise CheckpointError(
            f"{path}: refused to load: the file contains pickled code or objects, which are never executed ({code})"
        ) from None
    except Exception as exc:  # the safe unpickler raises many kinds on garbage; all mean "not a checkpoint"
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: truncated or not a checkpoint file ({msg})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        from .public_code import from_public  # a checkpoint of the paper's public code is mapped, else refused

        return {"format": FORMAT, "version": VERSION, **from_public(payload, path)}
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {payload.get('version')!r} is not supported (expected {VERSION})")
    for key, kind in (("arch", str), ("config", dict), ("state_dict", dict), ("meta", dict)):
        if not isinstance(payload.get(key), kind):
            raise CheckpointError(f"{path}: checkpoint field {key!r} is missing or not a {kind.__name__}")
    return payload


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> RecurrentSegmenter:
    """Rebuild the model in eval mode; its metadata is on `model.meta`."""
    payload = read(path)
    try:
        entry = get_entry(payload["arch"])
        config = entry.config_cls.from_dict(payload["config"])
    except ConfigError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    model = entry.builder(config)
    head = ((payload["meta"].get("inference") or {}).get("halting_head") if isinstance(payload["meta"], dict) else None)
    if head:  # the learned halting policy's head (models/halting.py), recorded in the card
        from .models.halting import HaltingHead

        try:
            model.halting_head = HaltingHead(int(head["in_features"]), int(head["hidden"]))
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: the card's inference.halting_head {head!r} is not "
                                  "{in_features, hidden}") from None
    expected = model.state_dict()
    state = payload["state_dict"]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match {payload['arch']}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{path}: weight {name!r} is not a tensor")
        if tensor.shape != expected[name].shape:
            raise CheckpointError(
                f"{path}: weight {name!r} has shape {tuple(tensor.shape)}, "
                f"{payload['arch']} with this config expects {tuple(expected[name].shape)}"
            )
    model.load_state_dict(state)
    model.meta = payload["meta"]
    return model.to(map_location).eval()
