"""The one fixed-point solver over a model's `step`: a fixed count or early exit, per sample.

Everything that iterates a recurrent segmenter runs this: the contract's `forward`, the traced
pieces of the ONNX export (the Loop body is one `advance`), training's forward steps and the
contraction check. Semantics, per sample:

- a sample is *active* until its relative state change is <= tol (converged) or not finite
  (diverged: a NaN residual must never count as converged, and `NaN > tol` is False);
- `iterations` counts the steps a sample ran, `residual` is its last step's relative change;
- a fixed count is early exit that only stops on divergence (tol = -1);
- a halting policy (models/halting.py) stops a sample when it fires `patience` steps in a row
  (`streak` counts them); why each sample stopped is `stop_reasons`.

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

from ..budget import Budget
from ..errors import InputError
from .halting import HaltRule, fires

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
    streak: Tensor | None = None  # int64 [B]: steps in a row the halting policy fired

    @property
    def diverged(self) -> Tensor:
        return ~torch.isfinite(self.residual) & (self.iterations > 0)

    def converged(self, tol: float) -> Tensor:
        return self.residual <= tol


def start(h: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The per-sample bookkeeping before the first step: (active, iterations, residual, streak)."""
    batch = h.shape[0]
    return (
        torch.ones(batch, dtype=torch.bool, device=h.device),
        torch.zeros(batch, dtype=torch.int64, device=h.device),
        torch.full((batch,), float("inf"), dtype=torch.float32, device=h.device),
        torch.zeros(batch, dtype=torch.int64, device=h.device),
    )


@dataclass(frozen=True)
class Halting:
    """A policy bound to the model whose heads it reads; threshold and patience are tensors so an
    exported Loop takes them as inputs."""

    rule: HaltRule
    model: object
    threshold: Tensor
    patience: Tensor

    @classmethod
    def of(cls, model, policy: str = "tol", threshold: float | None = None, patience: int = 1) -> "Halting | None":
        """None for the tol policy; InputError for a policy this model cannot run."""
        if policy in (None, "tol"):
            return None
        if policy == "stable" and not hasattr(model, "answer_proxy"):
            raise InputError(f"{type(model).__name__} declares no answer proxy: the stable policy cannot run on it")
        if policy == "learned" and getattr(model, "halting_head", None) is None:
            raise InputError(f"{type(model).__name__} has no halting head: fit one (crbp-deploy calibrate --fit-head) "
                             "before using the learned policy")
        return cls(HaltRule(policy, threshold, patience), model, torch.tensor(float(threshold)), torch.tensor(int(patience)))


def _rows(tree, index: Tensor):
    return pytree.tree_map(lambda t: t.index_select(0, index) if isinstance(t, Tensor) else t, tree)


def advance(step, ctx, h: Tensor, active: Tensor, iterations: Tensor, residual: Tensor, streak: Tensor, tol, *,
            execution: str = "compact", halting: Halting | None = None):
    """One step for the samples still active; returns the updated (h, active, iterations, residual, streak).

    Traceable by torch.export (the ONNX Loop body is this function, halting policy included); in eager
    mode a batch whose rows are all active skips the gather.
    """

    def policy(c, old, new, r, prev):
        return None if halting is None else fires(halting.rule, halting.model, c, old, new, r, prev, halting.threshold)

    def count(fired, streak):  # steps in a row the policy fired
        return torch.where(fired, streak + 1, torch.zeros_like(streak))

    if execution == "masked":
        new = step(ctx, h)
        r = relative_change(new, h)
        fired = policy(ctx, h, new, r, residual)
        if fired is not None:
            streak = torch.where(active, count(fired, streak), streak)
        residual = torch.where(active, r, residual)
        h = torch.where(active.view(-1, *([1] * (h.dim() - 1))), new, h)
    elif not torch.compiler.is_exporting() and bool(active.all()):
        new = step(ctx, h)
        r = relative_change(new, h)
        fired = policy(ctx, h, new, r, residual)
        if fired is not None:
            streak = count(fired, streak)
        h, residual = new, r
    else:
        index = active.float().nonzero().squeeze(1)  # NonZero on float: the type TensorRT documents
        rows, sub = h.index_select(0, index), _rows(ctx, index)
        new = step(sub, rows)
        r = relative_change(new, rows)
        fired = policy(sub, rows, new, r, residual.index_select(0, index))
        if fired is not None:
            streak = streak.index_copy(0, index, count(fired, streak.index_select(0, index)))
        h = h.index_copy(0, index, new)
        residual = residual.index_copy(0, index, r)
    iterations = iterations + active.long()
    active = active & (residual > tol) & torch.isfinite(residual)
    if halting is not None:
        active = active & (streak < halting.patience)
    return h, active, iterations, residual, streak


def fixed_point(
    step,
    ctx,
    h: Tensor,
    *,
    iters: int | None = None,
    max_iters: int | None = None,
    tol: float | None = None,
    execution: str = "compact",
    halting: Halting | None = None,
) -> tuple[Tensor, SolverStats]:
    """Run `step` from `h`: `iters=N` steps, or per sample until relative change <= tol, the halting
    policy fires `patience` steps in a row, or the cap max_iters.

    Under torch.export the loop is unrolled without early stops (the `unrolled` strategy); early
    exit in a graph is the ONNX Loop over `advance`.
    """
    rule = {} if halting is None else {"policy": halting.rule.policy, "threshold": halting.rule.threshold,
                                       "patience": halting.rule.patience}
    Budget(iters=iters, max_iters=max_iters, tol=tol, **rule)  # every budget rule lives in Budget
    if execution not in EXECUTIONS:
        raise InputError(f"execution must be one of {', '.join(EXECUTIONS)}, got {execution!r}")
    limit, threshold = (iters, -1.0) if iters is not None else (max_iters, float(tol))
    exporting = torch.compiler.is_exporting()
    active, iterations, residual, streak = start(h)
    for _ in range(limit):
        h, active, iterations, residual, streak = advance(
            step, ctx, h, active, iterations, residual, streak, threshold,
            execution="masked" if exporting else execution, halting=halting,
        )
        if not exporting and not bool(active.any()):
            break
    return h, SolverStats(iterations=iterations, residual=residual, streak=streak)


def split_budget(model, budget: dict) -> tuple[dict, Halting | None]:
    """Budget keyword arguments -> (the solver's iters/max_iters/tol, the bound halting policy)."""
    budget = Budget.from_dict(budget).kwargs()  # validated, the tol policy's keys dropped
    rule = {k: budget.pop(k) for k in ("policy", "threshold", "patience") if k in budget}
    return budget, Halting.of(model, **rule) if rule else None


#: Why a sample stopped. The last two are anytime stops a host makes between steps (serving/scheduler.py):
#: at the request's deadline, or when the next step would pass its cost cap (pixel-iterations).
STOP_REASONS = ("converged", "policy", "cap", "diverged", "fixed", "deadline", "budget")


def stop_reasons(iterations, residual, budget) -> list[str]:
    """Why each sample stopped, from what every backend reports (iterations, residual) and its budget:
    diverged (non-finite residual), converged (residual <= tol), cap (ran max_iters), else the policy
    fired; "fixed" for a fixed count."""
    import math

    if budget.get("iters") is not None:
        return ["fixed" if math.isfinite(float(r)) else "diverged" for r in residual]
    reasons = []
    for n, r in zip(iterations, residual):
        r = float(r)
        reasons.append("diverged" if not math.isfinite(r) else "converged" if r <= budget["tol"]
                       else "cap" if int(n) >= budget["max_iters"] else "policy")
    return reasons
