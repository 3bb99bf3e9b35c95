"""The one fixed-point solver over a model's `step`: a fixed count or early exit, per sample.

Everything that iterates a recurrent segmenter runs this: the contract's `forward`, the traced
pieces of the ONNX export (the Loop body is one `advance`), training's forward steps and the
contraction check. Semantics, per sample:

- a sample is *active* until its relative state change is <= tol (converged) or not finite
  (diverged: a NaN residual must never count as converged, and `NaN > tol` is False);
- `iterations` counts the steps a sample ran, `residual` is its last step's relative change;
- a fixed count is early exit that only stops on divergence (tol = -1).

Active-set execution: each step gathers the rows still active, steps only those and scatters them
back, so a batch costs the *sum* of its samples' iterations, not B x the slowest one. Masked
execution (every row stepped, converged rows frozen with `where`) stays available for graphs whose
consumers cannot handle a batch that shrinks inside a loop (TensorRT's ILoop).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from ..budget import check_budget
from ..errors import InputError

#: Execution of a batch: "compact" (active rows only) or "masked" (every row, converged ones frozen).
EXECUTIONS = ("compact", "masked")


def relative_change(new: Tensor, old: Tensor) -> Tensor:
    """Per-sample ||new - old|| / ||old||, always in fp32: a low-precision state cannot stall the
    test on rounding, and the floor on ||old|| (zero state) does not underflow as it would in fp16."""
    new32, old32 = new.detach().float().flatten(1), old.detach().float().flatten(1)
    return (new32 - old32).norm(dim=1) / old32.norm(dim=1).clamp_min(1e-12)


@dataclass
class SolverStats:
    """Per-sample statistics of one solve (torchdeq's `info`)."""

    iterations: Tensor  # int64 [B]: steps run
    residual: Tensor  # float32 [B]: relative change of the last step (inf before the first)

    @property
    def diverged(self) -> Tensor:
        return ~torch.isfinite(self.residual) & (self.iterations > 0)

    def converged(self, tol: float) -> Tensor:
        return self.residual <= tol


def start(h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The per-sample bookkeeping before the first step: (active, iterations, residual)."""
    batch = h.shape[0]
    return (
        torch.ones(batch, dtype=torch.bool, device=h.device),
        torch.zeros(batch, dtype=torch.int64, device=h.device),
        torch.full((batch,), float("inf"), dtype=torch.float32, device=h.device),
    )


def _rows(tree, index: Tensor):
    return pytree.tree_map(lambda t: t.index_select(0, index) if isinstance(t, Tensor) else t, tree)


def advance(step, ctx, h: Tensor, active: Tensor, iterations: Tensor, residual: Tensor, tol, *, execution: str = "compact"):
    """One step for the samples still active; returns the updated (h, active, iterations, residual).

    Traceable by torch.export (the ONNX Loop body is this function); in eager mode a batch whose
    rows are all active skips the gather.
    """
    if execution == "masked":
        new = step(ctx, h)
        residual = torch.where(active, relative_change(new, h), residual)
        h = torch.where(active.view(-1, *([1] * (h.dim() - 1))), new, h)
    elif not torch.compiler.is_exporting() and bool(active.all()):
        h, old = step(ctx, h), h
        residual = relative_change(h, old)
    else:
        index = active.float().nonzero().squeeze(1)  # NonZero on float: the type TensorRT documents
        rows = h.index_select(0, index)
        new = step(_rows(ctx, index), rows)
        h = h.index_copy(0, index, new)
        residual = residual.index_copy(0, index, relative_change(new, rows))
    iterations = iterations + active.long()
    active = active & (residual > tol) & torch.isfinite(residual)
    return h, active, iterations, residual


def fixed_point(
    step,
    ctx,
    h: Tensor,
    *,
    iters: int | None = None,
    max_iters: int | None = None,
    tol: float | None = None,
    execution: str = "compact",
) -> tuple[Tensor, SolverStats]:
    """Run `step` from `h`: `iters=N` steps, or per sample until relative change <= tol (cap max_iters).

    Under torch.export the loop is unrolled without early stops (the `unrolled` strategy); early
    exit in a graph is the ONNX Loop over `advance`.
    """
    check_budget(iters, max_iters, tol)
    if execution not in EXECUTIONS:
        raise InputError(f"execution must be one of {', '.join(EXECUTIONS)}, got {execution!r}")
    limit, threshold = (iters, -1.0) if iters is not None else (max_iters, float(tol))
    exporting = torch.compiler.is_exporting()
    active, iterations, residual = start(h)
    for _ in range(limit):
        h, active, iterations, residual = advance(
            step, ctx, h, active, iterations, residual, threshold, execution="masked" if exporting else execution
        )
        if not exporting and not bool(active.any()):
            break
    return h, SolverStats(iterations=iterations, residual=residual)
