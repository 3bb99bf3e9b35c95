"""solve(): run a recurrent segmenter for training with BPTT, C-BPTT, RBP or C-RBP.

Uses only the recurrent-segmenter contract (encode / init_state / step / readout), so every
registered model trains the same way.

- "bptt":  all `steps` steps in the autograd graph (memory O(steps)).
- "cbptt": BPTT plus the LCP on the last two states.
- "rbp":   steps−1 steps without a graph, one recorded step, Neumann-series backward (O(1)).
- "crbp":  RBP plus the LCP on the recorded step — the paper's method.

RBP differentiates the fixed point, which does not depend on h0: in rbp/crbp no gradient flows
through `init_state`, and models that declare `recurrent = False` (the work is in init_state,
step is the identity) are rejected for those modes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from ..errors import InputError
from ..models.contract import MAX_ITERATIONS, RecurrentSegmenter
from ..models.solver import fixed_point, relative_change
from .anderson import anderson
from .lcp import DEFAULT_KIND, DEFAULT_LAMBDA, DEFAULT_REDUCTION, LCP_KINDS, LCP_REDUCTIONS, lipschitz_penalty
from .rbp import (
    BACKWARD_SOLVERS,
    DEFAULT_CAP,
    DEFAULT_FLOOR,
    DEFAULT_GROWTH_LIMIT,
    DEFAULT_PATIENCE,
    DEFAULT_RULE,
    NEUMANN_RULES,
    NeumannInfo,
    implicit_state,
)

GRAD_MODES = ("bptt", "cbptt", "rbp", "crbp")
#: The graph-free forward of rbp/crbp: plain iteration of the step, or Anderson acceleration (anderson.py).
FORWARD_SOLVERS = ("picard", "anderson")


@dataclass
class Solution:
    """What one training forward produced; add `penalty` (times a weight) to the task loss."""

    outputs: dict[str, Tensor]  # the model's readout heads
    state: Tensor  # final h (for rbp/crbp its gradient is replaced by the Neumann solve)
    penalty: Tensor  # LCP scalar (zero, without graph, for bptt/rbp)
    residual: Tensor  # per sample ‖h_T − h_{T−1}‖ / ‖h_{T−1}‖, detached: is training converged?
    neumann: NeumannInfo | None = None  # rbp/crbp; filled in when backward reaches `state`
    forward_steps: Tensor | None = None  # int64 [B]: steps each sample ran before the recorded one


def _check_int(name: str, value, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise InputError(f"{name}={value} is outside {low}..{high}")


def _check_number(name: str, value, *, low: float = -math.inf, strict: bool = False, inf_ok: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    ok = ok and (math.isfinite(value) or (inf_ok and value == math.inf))
    if not ok or value < low or (strict and value == low):
        kind = "a number (inf allowed)" if inf_ok else "a finite number"
        bound = "" if low == -math.inf else f" {'>' if strict else '>='} {low:g}"
        raise InputError(f"{name} must be {kind}{bound}, got {value!r}")


def _check_args(model, images, steps, grad, neumann_steps, lcp_lambda, lcp_reduction, neumann_cap, neumann_floor,
                neumann_rule, neumann_patience, neumann_growth_limit):
    if grad not in GRAD_MODES:
        raise InputError(f"grad must be one of {', '.join(GRAD_MODES)}, got {grad!r}")
    _check_int("steps", steps, 1, MAX_ITERATIONS)
    _check_int("neumann_steps", neumann_steps, 0, MAX_ITERATIONS)
    _check_number("lcp_lambda", lcp_lambda)
    _check_number("neumann_cap", neumann_cap, low=0, strict=True, inf_ok=True)
    _check_number("neumann_floor", neumann_floor, low=0)
    if neumann_rule not in NEUMANN_RULES:
        raise InputError(f"neumann_rule must be one of {', '.join(NEUMANN_RULES)}, got {neumann_rule!r}")
    _check_int("neumann_patience", neumann_patience, 1, MAX_ITERATIONS)
    _check_number("neumann_growth_limit", neumann_growth_limit, low=1, inf_ok=True)
    if lcp_reduction not in LCP_REDUCTIONS:
        raise InputError(f"lcp_reduction must be one of {', '.join(LCP_REDUCTIONS)}, got {lcp_reduction!r}")
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if grad in ("rbp", "crbp") and getattr(model, "recurrent", True) is False:
        name = getattr(model, "arch", "") or type(model).__name__
        raise InputError(f"{name} is feed-forward (recurrent = False): {grad} needs a recurrent step; use grad='bptt'")
    if isinstance(model, RecurrentSegmenter):
        model.check_images(images)
    elif not isinstance(images, Tensor) or not images.is_floating_point():
        raise InputError("images must be a floating-point torch.Tensor")
    if not torch.is_grad_enabled():
        raise InputError("solve() builds a training graph; call it with gradients enabled, not under torch.no_grad()")


def _run_steps(step, ctx, h: Tensor, n: int, tol: float = 0.0, solver: str = "picard") -> tuple[Tensor, Tensor]:
    """The forward steps before the recorded one: `n`, or per sample until the relative change is
    <= tol (at most n) when tol > 0; none when n == 0. picard: the one fixed-point solver of the
    models; anderson: accelerated (graph-free only). Returns h and the steps each sample ran."""
    if not n:
        return h, torch.zeros(h.shape[0], dtype=torch.int64, device=h.device)
    if solver == "anderson":
        h, stats = anderson(step, ctx, h, max_iters=n, tol=tol)
    else:
        budget = {"max_iters": n, "tol": tol} if tol > 0 else {"iters": n}
        h, stats = fixed_point(step, ctx, h, **budget)
    return h, stats.iterations


def _differentiable(h: Tensor) -> Tensor:
    """A step input the LCP can differentiate against (h0 from zeros_like carries no graph)."""
    return h if h.requires_grad else h.detach().requires_grad_()


def _penalty(model, ctx, last: Tensor, prev: Tensor, every: int, lam: float, reduction: str, kind: str) -> Tensor:
    """The LCP of the recorded step, or of one step re-run on every `every`-th sample (its own graph)."""
    if every == 1 or prev.shape[0] <= 1:
        return lipschitz_penalty(last, prev, lam, reduction, kind)
    index = torch.arange(0, prev.shape[0], every, device=prev.device)
    sub = pytree.tree_map(lambda t: t.index_select(0, index) if isinstance(t, Tensor) else t, ctx)
    rows = prev.index_select(0, index)
    rows = rows if rows.requires_grad and not rows.is_leaf else rows.detach().requires_grad_()
    return lipschitz_penalty(model.step(sub, rows), rows, lam, reduction, kind)


def _check_solvers(grad, forward_tol, forward_solver, backward_solver, backward_tol, lcp_every, lcp_kind,
                   start_state) -> None:
    _check_number("forward_tol", forward_tol, low=0)
    if forward_solver not in FORWARD_SOLVERS:
        raise InputError(f"forward_solver must be one of {', '.join(FORWARD_SOLVERS)}, got {forward_solver!r}")
    if backward_solver not in BACKWARD_SOLVERS:
        raise InputError(f"backward_solver must be one of {', '.join(BACKWARD_SOLVERS)}, got {backward_solver!r}")
    _check_number("backward_tol", backward_tol, low=0)
    _check_int("lcp_every", lcp_every, 1, MAX_ITERATIONS)
    if lcp_kind not in LCP_KINDS:
        raise InputError(f"lcp_kind must be one of {', '.join(LCP_KINDS)}, got {lcp_kind!r}")
    if start_state is not None and grad not in ("rbp", "crbp"):
        raise InputError(f"start_state applies to rbp/crbp (a fixed point's gradient); {grad} differentiates the steps from h0")


def solve(
    model,
    images: Tensor,
    *,
    steps: int,
    grad: str = "crbp",
    neumann_steps: int = 15,
    lcp_lambda: float = DEFAULT_LAMBDA,
    lcp_reduction: str = DEFAULT_REDUCTION,
    neumann_cap: float = DEFAULT_CAP,
    neumann_floor: float = DEFAULT_FLOOR,
    neumann_rule: str = DEFAULT_RULE,
    neumann_patience: int = DEFAULT_PATIENCE,
    neumann_growth_limit: float = DEFAULT_GROWTH_LIMIT,
    forward_tol: float = 0.0,
    forward_solver: str = "picard",
    backward_solver: str = "neumann",
    backward_tol: float = 0.0,
    lcp_every: int = 1,
    lcp_kind: str = DEFAULT_KIND,
    forward_step=None,
    start_state=None,
) -> Solution:
    """Run `steps` steps of `model` on `images`, recorded for the gradient method `grad`.

    Neumann series (rbp/crbp; see rbp.py): neumann_steps: most terms K (public code: 15);
    neumann_cap: stop when ‖g‖ exceeds neumann_cap·‖dL/dh_T‖ (inf: off); neumann_floor: stop when
    ‖v_k‖ < neumann_floor·‖dL/dh_T‖ (relative, so the loss scale does not matter); neumann_rule:
    "patient" (stop on growth after neumann_patience growing terms in a row or a term above
    neumann_growth_limit·‖dL/dh_T‖) or "public" (stop at the first growing term).
    lcp_lambda / lcp_reduction: the LCP's λ and reduction (cbptt/crbp only; see lcp.py).
    forward_tol (rbp/crbp): > 0 runs the graph-free forward per sample until its relative change is
    <= forward_tol, `steps` at most: RBP differentiates a fixed point, so its gradient is only right
    when the forward has reached one (docs/contraction.md); converged samples stop costing steps.
    forward_solver (rbp/crbp): "picard" (plain steps) or "anderson" (the same fixed point in about a
    third of the steps, measured on the bundled Pathfinder model; see anderson.py).
    backward_solver (rbp/crbp): "neumann" (the series above) or "anderson" (rbp.anderson_vjp: the same
    implicit gradient solved to a per-sample relative residual <= backward_tol, neumann_steps VJPs at most).
    lcp_every (cbptt/crbp): the LCP on samples 0, k, 2k, ... of the batch only: the same penalty estimated
    on fewer samples (unbiased; its double backward is the costliest part of a step after the solves).
    lcp_kind (cbptt/crbp): "columns" (the paper's 1ᵀJ) or "spectral" (an estimate of ρ(J); lcp.py).
    forward_step (rbp/crbp): the graph-free forward's step instead of model.step (compiled.py: torch.compile).
    start_state (rbp/crbp): maps the cold initial state to the graph-free forward's start (warm_start.py:
    last epoch's fixed points); the fixed point, and so the gradient, does not depend on it.
    """
    _check_args(model, images, steps, grad, neumann_steps, lcp_lambda, lcp_reduction, neumann_cap, neumann_floor,
                neumann_rule, neumann_patience, neumann_growth_limit)
    _check_solvers(grad, forward_tol, forward_solver, backward_solver, backward_tol, lcp_every, lcp_kind, start_state)
    ctx = model.encode(images)
    h = model.init_state(ctx)
    info = None
    if grad in ("bptt", "cbptt"):
        h, forward_steps = _run_steps(model.step, ctx, h, steps - 1)
        prev = _differentiable(h) if grad == "cbptt" else h
        last = model.step(ctx, prev)
        state = last
    else:
        with torch.no_grad():
            h = start_state(h) if start_state is not None else h
            h, forward_steps = _run_steps(forward_step or model.step, ctx, h, steps - 1, forward_tol, forward_solver)
        prev = h.detach().requires_grad_()
        last = model.step(ctx, prev)
        info = NeumannInfo()
        state = implicit_state(
            last, prev, steps=neumann_steps, info=info, cap=neumann_cap, floor=neumann_floor,
            rule=neumann_rule, patience=neumann_patience, growth_limit=neumann_growth_limit,
            solver=backward_solver, tol=backward_tol,
        )
    if grad in ("cbptt", "crbp"):
        penalty = _penalty(model, ctx, last, prev, lcp_every, lcp_lambda, lcp_reduction, lcp_kind)
    else:
        penalty = torch.zeros((), dtype=last.dtype, device=last.device)
    outputs = model.readout(ctx, state)
    residual = relative_change(last, prev)  # detached, fp32
    return Solution(outputs=outputs, state=state, penalty=penalty, residual=residual, neumann=info,
                    forward_steps=forward_steps)
