"""torch.compile of the graph-free training forward (`train --compile`).

Why only that part: the forward before the recorded step is half of a C-RBP training step, and the
hGRU step is two k x k convolutions among ~20 element-wise passes (gates, norms, softplus) that
inductor fuses. Measured on the bundled crbp-pathfinder (batch 32, 64 px, one thread, Intel Xeon
2.8 GHz): 95 ms per eager step, 65 ms compiled. The rest stays eager, by measurement too: a VJP
through a compiled step took 143 ms against 94 eager (its one backward graph also computes every
parameter's gradient), 83 ms with the parameters detached, which does not pay for the second forward
that needs; and the LCP's double backward is beyond AOTAutograd.

`dynamic=True`: the per-sample solvers step only the samples still running, so the batch size
changes from step to step; a static compile would recompile for each size.
`layout_optimization` off: inductor otherwise moves the convolutions to channels-last, where this
step's GroupNorm and softplus are several times slower (docs/pathfinder_claims.md §1); measured on the
Anderson forward of one batch: 15% under eager with it off, 7% with it on.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable

import torch

from ..errors import ConfigError

CPU_COMPILERS = ("g++", "clang++", "c++")  # what inductor's C++ backend can build with


def compiler_missing(device: torch.device) -> str | None:
    """Why torch.compile cannot build kernels for `device` here, or None. On a CPU inductor writes C++."""
    if device.type != "cpu":
        return None
    wanted = [os.environ["CXX"]] if os.environ.get("CXX") else list(CPU_COMPILERS)
    if any(shutil.which(name) for name in wanted):
        return None
    return f"no C++ compiler ({' or '.join(wanted)}) on PATH"


def compile_step(model, device: torch.device) -> Callable:
    """model.step compiled for the no-grad forward; a clear error where it cannot be."""
    missing = compiler_missing(device)
    if missing:
        raise ConfigError(f"--compile: torch.compile cannot build CPU kernels here ({missing}); install one or drop --compile")
    return torch.compile(model.step, dynamic=True, options={"layout_optimization": False})
