"""Anderson acceleration of the graph-free training forward, per sample, with early stop.

Why: RBP differentiates a fixed point, so the forward has to reach one; plain iteration (Picard)
converges at the contraction rate ρ (the bundled Pathfinder model needs ~50 steps to a relative
change of 1e-3). Anderson mixing (Anderson 1965; Walker & Ni 2011; the default forward solver of
deep equilibrium models, e.g. torchdeq) extrapolates from the last `memory` iterates and reaches the
same fixed point in far fewer steps. Each sample has its own small least-squares problem and stops
on its own, so converged samples stop costing steps (the rows still active are gathered and
stepped, as in models/solver.py).

Residual: ‖f(x) − x‖ / ‖f(x)‖ per sample, in fp32 — for a plain step (x = h, f(x) = the new h) this
is the solver's `relative_change` up to which state normalises it. The state returned is always a
step's output f(x), never an extrapolated point, so it is a state the model can produce.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

DEFAULT_MEMORY = 5  # iterates mixed (torchdeq and the DEQ tutorial use 5-6)
DEFAULT_RIDGE = 1e-4  # Tikhonov term on the Gram matrix, relative to its scale


@dataclass
class AndersonStats:
    iterations: Tensor  # int64 [B]: steps (evaluations of f) per sample
    residual: Tensor  # float32 [B]: ‖f(x) − x‖ / ‖f(x)‖ at the last step


def _residual(fx: Tensor, x: Tensor) -> Tensor:
    fx32, x32 = fx.float(), x.float()
    return (fx32 - x32).norm(dim=1) / fx32.norm(dim=1).clamp_min(1e-12)


def _mix(gs: Tensor, fs: Tensor, ridge: float) -> Tensor:
    """The Anderson point Σ αᵢ f(xᵢ) with Σ αᵢ = 1 minimising ‖Σ αᵢ gᵢ‖, gᵢ = f(xᵢ) − xᵢ, per row.

    gs, fs: [A, n, D] (n iterates). The Gram matrix is one fp32 batched product (one pass over the
    history: the mixing costs a fraction of a step), the n x n system is solved in float64 through
    the normal equations with the constraint eliminated: α ∝ (GGᵀ + εI)⁻¹ 1.
    """
    gram = torch.bmm(gs, gs.transpose(1, 2)).double()
    scale = gram.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-30)
    eye = torch.eye(gram.shape[1], dtype=gram.dtype, device=gram.device)
    a = torch.linalg.solve(gram + (ridge * scale)[:, None, None] * eye, torch.ones_like(gram[:, :, :1]))
    alpha = (a / a.sum(1, keepdim=True)).to(fs.dtype)
    return torch.bmm(alpha.transpose(1, 2), fs).squeeze(1)


def anderson(step, ctx: Tensor, h: Tensor, *, max_iters: int, tol: float, memory: int = DEFAULT_MEMORY,
             ridge: float = DEFAULT_RIDGE) -> tuple[Tensor, AndersonStats]:
    """Solve h = step(ctx, h) per sample from `h`: until ‖f(x) − x‖/‖f(x)‖ <= tol or `max_iters` steps.

    Call under torch.no_grad(). Returns the last step output of every sample and its statistics.
    A sample whose residual turns non-finite stops (diverged), as in the fixed-point solver.
    """
    batch, shape = h.shape[0], h.shape[1:]
    fmt = torch.channels_last if h.dim() == 4 and h.is_contiguous(memory_format=torch.channels_last) else None

    def f(rows: Tensor, x: Tensor) -> Tensor:  # flat rows -> flat step output
        state = x.view(len(rows), *shape)
        if fmt is not None:
            state = state.contiguous(memory_format=fmt)
        sub = ctx if len(rows) == batch else ctx.index_select(0, rows)
        return step(sub, state).reshape(len(rows), -1)

    everyone = torch.arange(batch, device=h.device)
    x = h.reshape(batch, -1).clone()
    fx = f(everyone, x)
    gs = torch.zeros(batch, memory, x.shape[1], dtype=x.dtype, device=x.device)  # residuals f(x) - x
    fs = torch.zeros_like(gs)
    gs[:, 0], fs[:, 0] = fx - x, fx
    out = fx.clone()
    iterations = torch.ones(batch, dtype=torch.int64, device=h.device)
    residual = _residual(fx, x)
    active = (residual > tol) & torch.isfinite(residual)
    for k in range(1, max_iters):
        rows = active.nonzero().squeeze(1)
        if rows.numel() == 0:
            break
        n, slot, every = min(k, memory), k % memory, rows.numel() == batch
        if every:  # no gathers while the whole batch is still running
            x_new = _mix(gs[:, :n], fs[:, :n], ridge)  # k = 1: a plain step
            f_new = f(rows, x_new)
            gs[:, slot], fs[:, slot], out = f_new - x_new, f_new, f_new
        else:
            x_new = _mix(gs.index_select(0, rows)[:, :n], fs.index_select(0, rows)[:, :n], ridge)
            f_new = f(rows, x_new)
            gs[rows, slot], fs[rows, slot], out[rows] = f_new - x_new, f_new, f_new
        iterations[rows] += 1
        r = _residual(f_new, x_new)
        residual[rows] = r
        active[rows] = (r > tol) & torch.isfinite(r)
    state = out.view(batch, *shape)
    if fmt is not None:
        state = state.contiguous(memory_format=fmt)
    return state, AndersonStats(iterations=iterations, residual=residual)
