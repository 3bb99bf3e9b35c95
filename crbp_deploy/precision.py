"""Inference precision: one vocabulary (fp32, bf16, fp16) for every backend, what this machine can run,
and the parity tolerances a reduced-precision run is held to.

Why one module: bench rows, verify, predict and serving all take `--precision`, and each backend must
refuse a precision it cannot run natively with one line saying what is missing (never a silent fp32
fallback that a table would then mislabel).

Whatever the precision, the convergence test stays fp32: the solver computes the residual in fp32
(`models.solver.relative_change`) and the backends keep the recurrent state in fp32 (PyTorch autocast
runs the convolutions in bf16 and promotes the state update back to fp32; OpenVINO's CPU plugin keeps
the tail of the Loop body, the state update and the residual, in fp32). So a low-precision run can
neither stall on rounding noise nor stop early on it (tests/test_precision.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import InputError

PRECISIONS = ("fp32", "bf16", "fp16")
_ALIASES = {"f32": "fp32", "float32": "fp32", "float": "fp32", "bfloat16": "bf16", "f16": "fp16", "float16": "fp16", "half": "fp16"}


def canonical(name: str | None) -> str:
    """'fp32' | 'bf16' | 'fp16' for any usual spelling (None: fp32); InputError otherwise."""
    if name is None:
        return "fp32"
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in PRECISIONS:
        raise InputError(f"unknown precision {name!r}; use one of {', '.join(PRECISIONS)}")
    return key


@dataclass(frozen=True)
class Tolerance:
    """What a run in this precision must match against the fp32 PyTorch reference.

    `atol`/`rtol`: heads (logits, offsets in pixels); `iterations`: allowed |delta| per sample as a
    fraction of the reference count (0: identical); `pq`: allowed |delta PQ| in points.
    """

    atol: float
    rtol: float
    iterations: float
    pq: float


#: fp32: the rules ONNX Runtime is held to. bf16 (8 mantissa bits): heads within 0.5 absolute (logits of
#: magnitude ~10, offsets in pixels; measured <= 0.25), per-sample iterations within 35% (bf16 rounding
#: perturbs the path to the fixed point; measured 0-40% more steps at tol 1e-3, identical counts at the
#: bundled card's tol 0.03), PQ within 1.5 points: OpenVINO runs the whole graph in bf16, readout included,
#: measured -0.57 PQ on 48 generated scenes and -1.0 on 12 (one flipped segment moves PQ by ~1 on 12
#: scenes); PyTorch's bf16 step alone measured -0.02. See docs/precision.md.
TOLERANCES = {
    "fp32": Tolerance(atol=1e-4, rtol=1e-3, iterations=0.0, pq=0.1),
    "bf16": Tolerance(atol=0.5, rtol=0.05, iterations=0.35, pq=1.5),
    "fp16": Tolerance(atol=0.25, rtol=0.02, iterations=0.35, pq=1.0),
}


def tolerance(precision: str | None) -> Tolerance:
    return TOLERANCES[canonical(precision)]


def torch_cpu_support(precision: str) -> str | None:
    """None when PyTorch runs `precision` natively on this CPU, else what is missing (one phrase)."""
    import torch

    precision = canonical(precision)
    if precision == "fp32":
        return None
    if not torch.backends.mkldnn.is_available():
        return f"this PyTorch build has no oneDNN, which runs {precision} on CPU"
    if precision == "bf16" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "this CPU has no native bf16 (AVX512-BF16 or AMX) for PyTorch"
    if precision == "fp16" and not torch.ops.mkldnn._is_mkldnn_fp16_supported():
        return "this CPU has no native fp16 (AVX512-FP16 or AMX-FP16) for PyTorch"
    return None


def torch_dtype(precision: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[canonical(precision)]
