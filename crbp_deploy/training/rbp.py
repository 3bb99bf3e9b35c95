"""Neumann-series recurrent back-propagation (Almeida–Pineda RBP, Liao et al. 2018).

At a fixed point h* = F(x, h*) the implicit function theorem gives the gradient that BPTT
unrolled forever would: dL/dh* (I − J)⁻¹, J = dF/dh. Its truncated Neumann series
g = Σ_k (Jᵀ)ᵏ v₀ needs only vector-Jacobian products of ONE recorded step, so memory does not
grow with the number of forward steps. Stopping rules follow the paper's public code (stop and
keep g_{k−1}), with the absolute gradient-norm cap of that code (‖g‖ > 1, which ties the
solver to the loss scale) replaced by a cap relative to ‖v₀‖.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

#: Why the series stopped. "steps": all `steps` terms were added; "growth": ‖v_k‖ > ‖v_{k−1}‖
#: (the series diverges: F is not contractive there); "cap": ‖g_k‖ > cap·‖v₀‖; "floor":
#: ‖v_k‖ < floor (nothing left to add); "nonfinite": v_k has inf/nan. All but "steps" drop v_k.
STOP_REASONS = ("steps", "growth", "cap", "floor", "nonfinite")


@dataclass
class NeumannInfo:
    """Statistics of one Neumann solve; `stop` is None until backward has reached the state."""

    terms: int = 0  # VJPs accepted into g (0 = plain one-step backprop)
    stop: str | None = None
    v_norms: list[float] = field(default_factory=list)  # ‖v_0‖, ‖v_1‖, ... incl. a rejected last one
    g_norm: float = math.nan


def neumann_vjp(
    last: Tensor,
    prev: Tensor,
    v0: Tensor,
    *,
    steps: int = 15,
    cap: float = 100.0,
    floor: float = 1e-9,
    info: NeumannInfo | None = None,
) -> tuple[Tensor, NeumannInfo]:
    """g = Σ_{k=0..K} (Jᵀ)ᵏ v₀ with J = d last / d prev, truncated by the rules in STOP_REASONS.

    Norms are over the whole tensor (the batch together), as in the public code. `cap` bounds
    the amplification ‖g‖/‖v₀‖ (100 ≙ a contraction rate of 0.99); since the growth rule keeps
    ‖v_k‖ ≤ ‖v₀‖, so ‖g_k‖ ≤ (k+1)‖v₀‖, it can only fire when `steps` ≥ cap. `info`, if given,
    is filled in place.
    """
    info = info if info is not None else NeumannInfo()
    g, v = v0, v0
    v_norm = float(v0.norm())
    info.terms, info.stop, info.v_norms = 0, "steps", [v_norm]
    limit = cap * v_norm
    for k in range(1, steps + 1):
        (v_next,) = torch.autograd.grad(last, prev, v, retain_graph=True)
        n = float(v_next.norm())
        info.v_norms.append(n)
        if not math.isfinite(n):
            info.stop = "nonfinite"
            break
        if n < floor:
            info.stop = "floor"
            break
        if n > v_norm:
            info.stop = "growth"
            break
        g_next = g + v_next
        if float(g_next.norm()) > limit:
            info.stop = "cap"
            break
        g, v, v_norm, info.terms = g_next, v_next, n, k
    info.g_norm = float(g.norm())
    return g, info


def implicit_state(last: Tensor, prev: Tensor, *, steps: int, cap: float, floor: float, info: NeumannInfo) -> Tensor:
    """`last` as a new tensor whose incoming gradient is replaced by its Neumann solve.

    Heads read the returned alias, so only the task gradient is solved; a gradient reaching
    `last` by another path (e.g. the LCP through a step's saved output) passes unchanged. The
    replaced gradient then flows through the one recorded step to the parameters and the encoder.
    """
    state = last.clone()

    def hook(grad: Tensor) -> Tensor:
        g, _ = neumann_vjp(last, prev, grad, steps=steps, cap=cap, floor=floor, info=info)
        return g

    state.register_hook(hook)
    return state
