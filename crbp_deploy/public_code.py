"""Checkpoints written by the paper's public code, recognised by their keys and shapes and mapped onto
`hgru-public` (models/public_hgru.py), so they export, verify and benchmark like the project's own.

The public Pathfinder code (c-rbp/pathfinder_experiments, mainclean.py) saves
`torch.save({'epoch', 'state_dict', 'best_prec1'})` as `model_fscore_XXXX_epoch_YY_checkpoint.pth.tar`;
the keys carry `module.` when it trained under DataParallel (`--parallel`). Its `--model` picks one of
three families; only the recurrent hConvGRU (`hgru`) maps here. `checkpoint.read` hands every file that
is not in the project's format to `from_public`, after the safe (weights_only) unpickling: nothing in
the file runs.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import torch

from .budget import Budget
from .errors import CheckpointError
from .models.public_hgru import PUBLIC_TIMESTEPS, PublicHGRU

CODE = "c-rbp/pathfinder_experiments (mainclean.py, models/hgrucleanSEG.py)"
FILE_KEYS = ("epoch", "state_dict", "best_prec1")
PER_CHANNEL = ("alpha", "gamma", "kappa", "w", "mu")  # public (C, 1, 1) -> here (1, C, 1, 1)

#: public hConvGRU key -> hgru-public key. The public cell builds four norms and uses bn[1] and bn[3].
HGRU_KEYS = {
    "conv0.weight": "conv0.weight", "conv0.bias": "conv0.bias",
    "unit1.w_gate_inh": "cell.w_inh", "unit1.w_gate_exc": "cell.w_exc",
    "unit1.u1_gate.weight": "cell.u1.weight", "unit1.u1_gate.bias": "cell.u1.bias",
    "unit1.u2_gate.weight": "cell.u2.weight", "unit1.u2_gate.bias": "cell.u2.bias",
    **{f"unit1.{p}": f"cell.{'omega' if p == 'w' else p}" for p in PER_CHANNEL},
    "unit1.bn.1.weight": "cell.norm_inh.weight", "unit1.bn.1.bias": "cell.norm_inh.bias",
    "unit1.bn.3.weight": "cell.norm_exc.weight", "unit1.bn.3.bias": "cell.norm_exc.bias",
    "bn.weight": "head_norm.weight", "bn.bias": "head_norm.bias",
    "conv6.weight": "head.weight", "conv6.bias": "head.bias",
}
UNUSED = tuple(f"unit1.bn.{i}.{p}" for i in (0, 2) for p in ("weight", "bias"))  # built, never applied
EXPECTED = frozenset(HGRU_KEYS) | frozenset(UNUSED)

#: The other families `mainclean.py --model` trains, by a key only they have.
OTHER_FAMILIES = {
    "unit1.Wxi.weight": "clstm (ConvLSTM, models/convlstm.py)",
    "conv7.weight": "ff (FFConvNet, models/FFnet.py)",
}


def from_public(payload: Any, path: str | Path) -> dict[str, Any]:
    """{arch, config, state_dict, meta} of hgru-public for a public hConvGRU checkpoint; a one-line
    CheckpointError naming what was expected, and which keys were missing or extra, for anything else."""
    state, prefixed = _state_dict(payload)
    if state is not None:
        for key, family in OTHER_FAMILIES.items():
            if key in state:
                raise CheckpointError(f"{path}: a {family} checkpoint of the paper's public code: not supported yet "
                                      "(supported: its hConvGRU, --model hgru)")
    if state is None or set(state) != EXPECTED:
        raise CheckpointError(_neither(payload, state, path))
    config = _config(state, path)
    mapped = {}
    for public, ours in HGRU_KEYS.items():
        tensor = state[public].float()
        mapped[ours] = tensor.reshape(1, -1, 1, 1) if public.split(".")[-1] in PER_CHANNEL else tensor
    return {"arch": PublicHGRU.arch, "config": config, "state_dict": mapped, "meta": card(payload, path, prefixed)}


def _state_dict(payload: Any) -> tuple[dict[str, Any] | None, bool]:
    """The weights (`module.` stripped) of a {'state_dict': ...} file or a bare state dict, else None."""
    if not isinstance(payload, dict):
        return None, False
    bare = bool(payload) and all(isinstance(v, torch.Tensor) for v in payload.values())
    state = payload if bare else payload.get("state_dict")
    if not isinstance(state, Mapping) or not state or not all(isinstance(k, str) for k in state):
        return None, False
    prefixed = all(k.startswith("module.") for k in state)
    return ({k[len("module."):] if prefixed else k: v for k, v in state.items()}, prefixed)


def _neither(payload: Any, state: dict | None, path: str | Path) -> str:
    expected = ("not a crbp-deploy checkpoint (a dict with format='crbp-deploy/checkpoint') nor a public-code "
                "hConvGRU checkpoint ({'epoch', 'state_dict', 'best_prec1'}, 'module.' optional)")
    if state is None:
        got = set(payload) if isinstance(payload, dict) else set()
        what = "" if isinstance(payload, dict) else f"; got a {type(payload).__name__}"
        missing, extra = sorted(set(FILE_KEYS) - got), sorted(map(str, got - set(FILE_KEYS)))
        return f"{path}: {expected}: missing keys {missing[:5]}, extra keys {extra[:5]}{what}"
    missing, extra = sorted(EXPECTED - set(state)), sorted(set(state) - EXPECTED)
    return (f"{path}: {expected}: state_dict keys missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
            f"extra {extra[:5]}{' ...' if len(extra) > 5 else ''}")


def _config(state: Mapping[str, Any], path: str | Path) -> dict[str, int]:
    """channels, kernel sizes and classes read off conv0, w_gate_inh and conv6; then every weight's shape
    checked against them, naming the first that does not fit."""
    for name in EXPECTED:
        if not isinstance(state[name], torch.Tensor) or not state[name].is_floating_point():
            raise CheckpointError(f"{path}: weight {name!r} is not a floating-point tensor")
    conv0, inh, conv6 = (tuple(state[k].shape) for k in ("conv0.weight", "unit1.w_gate_inh", "conv6.weight"))
    _need(len(conv0) == 4 and conv0[1] == 1 and conv0[2] == conv0[3] and conv0[2] % 2, "conv0.weight", conv0,
          "(C, 1, k, k) with odd k (one grayscale input channel)", path)
    _need(len(inh) == 4 and inh[2] == inh[3] and inh[2] % 2, "unit1.w_gate_inh", inh, "(C, C, k, k) with odd k", path)
    _need(len(conv6) == 4, "conv6.weight", conv6, "(classes, C, 1, 1)", path)
    c, k, i, n = conv0[0], inh[2], conv0[2], conv6[0]
    shapes = {"conv0.weight": (c, 1, i, i), "unit1.w_gate_inh": (c, c, k, k), "unit1.w_gate_exc": (c, c, k, k),
              "unit1.u1_gate.weight": (c, c, 1, 1), "unit1.u2_gate.weight": (c, c, 1, 1),
              "conv6.weight": (n, c, 1, 1), "conv6.bias": (n,),
              **{f"unit1.{p}": (c, 1, 1) for p in PER_CHANNEL}}
    for name in sorted(EXPECTED):
        want = shapes.get(name, (c,))  # every bias and norm weight: one per channel
        _need(tuple(state[name].shape) == want, name, tuple(state[name].shape), str(want), path)
    return {"channels": c, "kernel_size": k, "input_kernel": i, "num_classes": n}


def _need(ok: bool, name: str, shape: tuple, want: str, path: str | Path) -> None:
    if not ok:
        raise CheckpointError(f"{path}: public hConvGRU weight {name!r} has shape {shape}; expected {want}")


def _number(value: Any) -> float | int | None:
    """epoch / best_prec1 as plain JSON numbers (a 0-d tensor becomes its value)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if isinstance(value, int) or math.isfinite(value) else None


def card(payload: Mapping[str, Any], path: str | Path, prefixed: bool) -> dict[str, Any]:
    """The model card of an imported checkpoint: where it came from, what was mapped, what differs."""
    file = payload if "state_dict" in payload else {}
    return {
        "training": f"not trained here: weights from the paper's public code, {CODE}",
        "public_code": {
            "code": CODE, "model": "hConvGRU", "file": Path(path).name, "epoch": _number(file.get("epoch")),
            "best_prec1": _number(file.get("best_prec1")), "dataparallel_prefix": prefixed,
            "timesteps": PUBLIC_TIMESTEPS, "input_size": 150,  # mainclean.py resizes every image to 150x150
            "dropped": list(UNUSED),
            "input": "1 grayscale channel in [0, 1] (the public loader: convert('L'), / 255)",
        },
        "normalisation": (
            "per-sample statistics (each image's own mean and variance per channel, with the public eps and "
            "affine) in place of the public BatchNorms' batch statistics (track_running_stats=False): equal to "
            "the public forward at batch size 1; each image's answer is independent of its batch"),
        "inference": {"budget": Budget.DEFAULT.kwargs()},
    }
