"""Neumann-series recurrent back-propagation (Almeida–Pineda RBP, Liao et al. 2018).

At a fixed point h* = F(x, h*) the implicit function theorem gives the gradient that BPTT
unrolled forever would: dL/dh* (I − J)⁻¹, J = dF/dh. Its truncated Neumann series
g = Σ_k (Jᵀ)ᵏ v₀ needs only vector-Jacobian products of ONE recorded step, so memory does not
grow with the number of forward steps.

Two stopping rules (NEUMANN_RULES):

- "public": the paper's public code — stop and keep g_{k−1} the first time ‖v_k‖ > ‖v_{k−1}‖.
  The series converges when the spectral radius ρ(J) < 1, but a non-normal J (‖J‖ > 1 > ρ)
  makes the first terms grow before they decay; this rule then throws the whole series away
  (measured on the bundled panoptic model: 0 terms on every batch, see docs/contraction.md).
- "patient" (default): stop on growth only when ‖v_k‖ has grown `patience` terms in a row, or
  passed `growth_limit`·‖v₀‖. It then keeps g up to the term before that run of growth began —
  the smallest-term truncation of a series that looks divergent — so a divergent series costs
  at most `patience` extra VJPs and never changes g, while a convergent series with a short
  transient keeps all its terms.

Both rules share the other stops. The public code's absolute limits (‖g‖ > 1, ‖v‖ < 1e-9) tie
the solver to the loss scale (a loss ×1e-9 stopped at 0 terms); here the cap and the floor are
relative to ‖v₀‖, so the solve is invariant to the scale of the loss.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

#: How the implicit gradient g = (I − Jᵀ)⁻¹ v₀ is solved: the Neumann series (the paper's) or Anderson
#: mixing on g = Jᵀg + v₀ (anderson_vjp: the same g in fewer VJPs, measured in docs/pathfinder_claims.md).
BACKWARD_SOLVERS = ("neumann", "anderson")

#: Why the series stopped. "steps": all `steps` terms were added; "growth": the terms grew (see
#: the rules above); "cap": ‖g_k‖ > cap·‖v₀‖; "floor": ‖v_k‖ < floor·‖v₀‖ (nothing left to add);
#: "nonfinite": v_k has inf/nan. For anderson_vjp "floor" means every sample's residual reached its tolerance. On growth / cap / nonfinite g is rolled back to before the
#: current run of growing terms (for the public rule: to g_{k−1}).
STOP_REASONS = ("steps", "growth", "cap", "floor", "nonfinite")
NEUMANN_RULES = ("patient", "public")

#: Defaults shared by neumann_vjp, solve() and TrainConfig (the CLI repeats them; a test checks).
DEFAULT_RULE = "patient"
DEFAULT_PATIENCE = 3  # growing terms in a row before a series counts as divergent
DEFAULT_GROWTH_LIMIT = 4.0  # a term above 4‖v₀‖ stops at once (see neumann_vjp)
DEFAULT_CAP = 100.0
DEFAULT_FLOOR = 1e-9


@dataclass
class NeumannInfo:
    """Statistics of one Neumann solve; `stop` is None until backward has reached the state."""

    terms: int = 0  # VJPs accepted into g (0 = plain one-step backprop)
    stop: str | None = None
    v_norms: list[float] = field(default_factory=list)  # ‖v_0‖, ‖v_1‖, ... every VJP computed
    g_norm: float = math.nan

    @property
    def ratio(self) -> float:
        """‖v_K‖/‖v₀‖ for the last accepted term K: how far the kept series had decayed (1 at K=0)."""
        if not self.v_norms or not self.v_norms[0] > 0:
            return math.nan
        return self.v_norms[self.terms] / self.v_norms[0]

    def summary(self) -> dict:
        """terms, stop and ratio: the per-batch record the trainer keeps."""
        return {"terms": self.terms, "stop": self.stop, "ratio": self.ratio}


def neumann_vjp(
    last: Tensor,
    prev: Tensor,
    v0: Tensor,
    *,
    steps: int = 15,
    cap: float = DEFAULT_CAP,
    floor: float = DEFAULT_FLOOR,
    rule: str = DEFAULT_RULE,
    patience: int = DEFAULT_PATIENCE,
    growth_limit: float = DEFAULT_GROWTH_LIMIT,
    info: NeumannInfo | None = None,
) -> tuple[Tensor, NeumannInfo]:
    """g = Σ_{k=0..K} (Jᵀ)ᵏ v₀ with J = d last / d prev, truncated by the rules in STOP_REASONS.

    Norms are over the whole tensor (the batch together), as in the public code. `cap` bounds
    the amplification ‖g‖/‖v₀‖ (100 ≙ a contraction rate of 0.99). `growth_limit` (patient rule)
    stops a fast blow-up before `patience` runs out; 4 lets the transient of a convergent
    non-normal series through (the bundled model's first term is 1.24‖v₀‖) while the rollback
    keeps g unchanged either way. `info`, if given, is filled in place.
    """
    if rule not in NEUMANN_RULES:
        raise ValueError(f"rule must be one of {', '.join(NEUMANN_RULES)}, got {rule!r}")
    info = info if info is not None else NeumannInfo()
    v0_norm = float(v0.norm())
    info.terms, info.stop, info.v_norms = 0, "steps", [v0_norm]
    g, v, v_norm = v0, v0, v0_norm
    keep, keep_terms = v0, 0  # g before the current run of growing terms began
    run = 0  # growing terms in a row (accepted provisionally by the patient rule)
    limit = cap * v0_norm
    if not math.isfinite(v0_norm):
        info.stop, steps = "nonfinite", 0
    elif v0_norm == 0.0:
        info.stop, steps = "floor", 0  # nothing to solve: g = v₀ = 0
    for k in range(1, steps + 1):
        (v_next,) = torch.autograd.grad(last, prev, v, retain_graph=True)
        n = float(v_next.norm())
        info.v_norms.append(n)
        if not math.isfinite(n):
            info.stop = "nonfinite"
            break
        if n < floor * v0_norm:
            info.stop = "floor"
            break
        run = run + 1 if n > v_norm else 0
        if run and (rule == "public" or run >= patience or n > growth_limit * v0_norm):
            info.stop = "growth"
            break
        g_next = g + v_next
        if float(g_next.norm()) > limit:
            info.stop = "cap"
            break
        g, v, v_norm, info.terms = g_next, v_next, n, k
        if run == 0:
            keep, keep_terms = g, k
    if info.stop in ("growth", "cap", "nonfinite"):
        g, info.terms = keep, keep_terms
    info.g_norm = float(g.norm())
    return g, info


def anderson_vjp(last: Tensor, prev: Tensor, v0: Tensor, *, steps: int = 15, tol: float = 1e-2,
                 cap: float = DEFAULT_CAP, info: NeumannInfo | None = None, **_rules) -> tuple[Tensor, NeumannInfo]:
    """g solving g = Jᵀg + v₀ by Anderson mixing per sample (J is block-diagonal over samples): at most
    `steps` VJPs, stopping once every sample's ‖Jᵀg + v₀ − g‖ / ‖Jᵀg + v₀‖ <= tol.

    The Neumann series is this fixed-point iteration without the mixing; on the bundled Pathfinder
    model (‖v₁₅‖/‖v₀‖ ≈ 0.2: ρ(J) ≈ 0.9) tol 2e-2 took 5 VJPs and left a relative error of 0.19 against
    the exact g, where 15 Neumann terms left 0.29 (tol 1e-2: 7 VJPs, 0.10). `info.v_norms` holds ‖v₀‖ then the residual norm after each VJP, so `ratio` is the
    residual left. A non-finite g or ‖g‖ > cap·‖v₀‖ falls back to g = v₀ (one-step backprop), as the
    Neumann rules roll back. The Neumann-only options (`_rules`: rule, patience, ...) are ignored.
    """
    from .anderson import DEFAULT_MEMORY, DEFAULT_RIDGE, _mix

    info = info if info is not None else NeumannInfo()
    batch, v0_norm = v0.shape[0], float(v0.norm())
    info.terms, info.stop, info.v_norms = 0, "steps", [v0_norm]
    if not math.isfinite(v0_norm) or v0_norm == 0.0:
        info.stop, info.g_norm = ("nonfinite" if v0_norm != 0.0 else "floor"), v0_norm
        return v0, info
    v = v0.reshape(batch, -1)
    gs = v.new_zeros(batch, DEFAULT_MEMORY, v.shape[1])  # residuals Jᵀg + v₀ − g
    fs = torch.zeros_like(gs)
    g, active = v, torch.ones(batch, dtype=torch.bool, device=v.device)
    for k in range(steps):
        (jg,) = torch.autograd.grad(last, prev, g.view_as(prev), retain_graph=True)
        fg = jg.reshape(batch, -1) + v
        diff = fg - g
        info.v_norms.append(float(diff[active].norm()))
        info.terms = k + 1
        if not math.isfinite(info.v_norms[-1]):
            info.stop = "nonfinite"
            break
        gs[:, k % DEFAULT_MEMORY], fs[:, k % DEFAULT_MEMORY] = diff, fg
        done = active & (diff.norm(dim=1) / fg.norm(dim=1).clamp_min(1e-30) <= tol)
        n = min(k + 1, DEFAULT_MEMORY)
        # a sample that reached tol keeps its last step (fg) from now on: its result does not depend on
        # which other samples share the batch (so data-parallel processes agree with one process)
        mixed = _mix(gs[:, :n], fs[:, :n], DEFAULT_RIDGE)
        g = torch.where(done[:, None], fg, torch.where(active[:, None], mixed, g))
        active = active & ~done
        if not bool(active.any()):
            info.stop = "floor"  # nothing left to add, as in the Neumann rules
            break
    info.g_norm = float(g.norm())
    if info.stop == "nonfinite" or not math.isfinite(info.g_norm) or info.g_norm > cap * v0_norm:
        info.stop = "nonfinite" if info.stop == "nonfinite" or not math.isfinite(info.g_norm) else "cap"
        g, info.terms, info.g_norm = v, 0, v0_norm
    return g.view_as(v0), info


def implicit_state(last: Tensor, prev: Tensor, *, steps: int, info: NeumannInfo, solver: str = "neumann",
                   tol: float = 0.0, **rules) -> Tensor:
    """`last` as a new tensor whose incoming gradient is replaced by its Neumann solve.

    Heads read the returned alias, so only the task gradient is solved; a gradient reaching
    `last` by another path (e.g. the LCP through a step's saved output) passes unchanged. The
    replaced gradient then flows through the one recorded step to the parameters and the encoder.
    `rules`: cap, floor, rule, patience, growth_limit of neumann_vjp; `solver` "anderson" solves with
    anderson_vjp to `tol` instead (at most `steps` VJPs).
    """
    state = last.clone()

    def hook(grad: Tensor) -> Tensor:
        if solver == "anderson":
            return anderson_vjp(last, prev, grad, steps=steps, tol=tol, info=info, **rules)[0]
        g, _ = neumann_vjp(last, prev, grad, steps=steps, info=info, **rules)
        return g

    state.register_hook(hook)
    return state
