"""Early exit on CUDA with one host sync per k steps: k masked solver steps captured as one CUDA graph.

Why: on a GPU a small recurrent step is launch-bound (a dozen kernels of microseconds each), and the
eager early-exit loop adds a device->host sync per step (`active.any()`). Capturing k steps replays
them as one launch and checks convergence once per k steps. Masked execution keeps shapes static
(a graph cannot shrink its batch); a converged row is frozen, and `iterations < max_iters` is
tested inside the graph, so per-sample iterations and residuals equal the eager solver's.

Run on an H200 by `make gpu-check` (docs/gpu.md): 4.1x eager at batch 1 for crbp-panoptic, with per-sample
iterations identical to the eager solver's.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..models.solver import SolverStats, advance, start


def k_steps(step, ctx, h: Tensor, active: Tensor, iterations: Tensor, residual: Tensor, streak: Tensor, tol: Tensor,
            cap: Tensor, k: int, halting=None):
    """k masked solver steps in place on static tensors (what the graph captures; runs on CPU too)."""
    for _ in range(k):
        active &= iterations < cap
        new = advance(step, ctx, h, active, iterations, residual, streak, tol, execution="masked", halting=halting)
        for buffer, value in zip((h, active, iterations, residual, streak), new):
            buffer.copy_(value)


class CudaGraphSolver:
    """`solve(ctx, h0, max_iters, tol) -> (h, SolverStats)`, graphs cached per input shape and dtype.

    `autocast`: a dtype (torch.bfloat16 / torch.float16) for the step's convolutions, or None (fp32).
    """

    def __init__(self, step, k: int = 4, autocast: torch.dtype | None = None):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.step, self.k, self.autocast = step, k, autocast
        self._graphs: dict[tuple, tuple] = {}

    def _body(self, buffers, halting) -> None:
        with torch.autocast("cuda", dtype=self.autocast, enabled=self.autocast is not None):
            k_steps(self.step, *buffers, self.k, halting=halting)

    def _graph(self, ctx: Tensor, h0: Tensor, halting):
        key = (tuple(ctx.shape), tuple(h0.shape), ctx.dtype, h0.dtype, None if halting is None else halting.rule)
        if key not in self._graphs:
            buffers = (ctx.clone(), h0.clone(), *start(h0),
                       torch.zeros((), device=h0.device), torch.zeros((), dtype=torch.int64, device=h0.device))
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires
                for _ in range(2):
                    self._body(buffers, halting)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._body(buffers, halting)
            self._graphs[key] = (graph, buffers, halting)  # the graph reads halting's tensors: keep them alive
        return self._graphs[key]

    def solve(self, ctx: Tensor, h0: Tensor, *, max_iters: int, tol: float, halting=None) -> tuple[Tensor, SolverStats]:
        """`halting`: a solver.Halting whose threshold/patience tensors live on the GPU (captured by address)."""
        if halting is not None:
            halting = type(halting)(halting.rule, halting.model, halting.threshold.to(h0.device),
                                    halting.patience.to(h0.device))
        graph, (ctx_s, h_s, active, iterations, residual, streak, tol_s, cap_s), _ = self._graph(ctx, h0, halting)
        ctx_s.copy_(ctx)
        h_s.copy_(h0)
        for buffer, value in zip((active, iterations, residual, streak), start(h0)):
            buffer.copy_(value)
        tol_s.fill_(tol)
        cap_s.fill_(max_iters)
        for _ in range(math.ceil(max_iters / self.k)):
            graph.replay()
            if not bool(active.any()):  # the one host sync per k steps
                break
        return h_s.clone(), SolverStats(iterations=iterations.clone(), residual=residual.clone(), streak=streak.clone())
