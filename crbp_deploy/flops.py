"""FLOP accounting: GFLOP per recurrent step from the model config, and the machine's measured peak.

Why: "how fast" only means something against what the hardware can do. `info` prints the step's cost;
`bench` turns each row's latency into useful GFLOP/s (step FLOPs x the iterations the row reports, over
its wall time, encoder and readout included) and a fraction of the fp32 / bf16 matrix-product peak it
measures at start on the same threads.
"""
from __future__ import annotations

import time

import torch

PEAK_SIZE = 1024  # square matmul: large enough to be compute-bound, small enough to time in ~1 s


def step_flops(model, height: int, width: int) -> int:
    """FLOPs (2 x multiply-adds) of one recurrent step for one height x width image; 0 for a model
    whose step is the identity (feed-forward baselines)."""
    cell = getattr(model, "cell", None)
    if not getattr(model, "recurrent", True) or cell is None or not hasattr(cell, "flops"):
        return 0
    stride = int(getattr(model, "stride", 1) or 1)
    return int(cell.flops(height // stride, width // stride))


def step_gflop(model, height: int, width: int) -> float:
    return step_flops(model, height, width) / 1e9


def measure_peak(threads: int | None = None, dtypes=("fp32", "bf16"), seconds: float = 0.5) -> dict[str, float]:
    """Best-of GFLOP/s of a PEAK_SIZE^3 matrix product per precision on `threads` threads (torch's
    oneDNN/MKL path: AMX for bf16 where the CPU has it). A precision the CPU lacks natively is left out."""
    from .precision import torch_cpu_support, torch_dtype

    if threads is not None:
        torch.set_num_threads(threads)
    peak: dict[str, float] = {}
    n = PEAK_SIZE
    for name in dtypes:
        if torch_cpu_support(name):
            continue
        a = torch.randn(n, n).to(torch_dtype(name))
        b = torch.randn(n, n).to(torch_dtype(name))
        torch.mm(a, b)  # warm-up: oneDNN picks and JITs its kernel
        best, spent = float("inf"), 0.0
        while spent < seconds:
            t0 = time.perf_counter()
            torch.mm(a, b)
            dt = time.perf_counter() - t0
            best, spent = min(best, dt), spent + dt
        peak[name] = round(2 * n**3 / best / 1e9, 1)
    return peak


def step_profile(model, precision: str = "fp32", batch: int = 8, size: tuple[int, int] = (64, 64),
                 steps: int = 20) -> dict[str, float]:
    """Where a step's time goes (PyTorch profiler, `steps` steps at `batch`): the convolutions' share and
    their own GFLOP/s against everything else (element-wise gates, norms, softplus, casts). Answers
    "what bounds the step" with numbers when it is far from the matmul peak."""
    from torch.profiler import ProfilerActivity, profile

    from .precision import torch_dtype

    height, width = size
    x = torch.rand(batch, model.in_channels, height, width)
    autocast = torch.autocast("cpu", dtype=torch_dtype(precision), enabled=precision != "fp32")
    with torch.no_grad():
        ctx = model.encode(x)
        h = model.init_state(ctx)
        with autocast:
            for _ in range(3):
                h = model.step(ctx, h).float()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                t0 = time.perf_counter()
                for _ in range(steps):
                    h = model.step(ctx, h).float()
                wall = time.perf_counter() - t0
    conv_us = sum(e.self_cpu_time_total for e in prof.key_averages() if "conv" in e.key or "mkldnn" in e.key)
    total_us = sum(e.self_cpu_time_total for e in prof.key_averages())
    flops = step_flops(model, height, width) * batch * steps
    conv_s = conv_us / 1e6
    return {
        "precision": precision, "batch": batch, "step_ms": round(1e3 * wall / steps, 3),
        "conv_share": round(conv_us / total_us, 3) if total_us else 0.0,
        "conv_gflops": round(flops / conv_s / 1e9, 1) if conv_s else 0.0,
        "step_gflops": round(flops / wall / 1e9, 1),
    }
