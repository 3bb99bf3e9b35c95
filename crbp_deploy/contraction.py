"""A measured contraction report: does the Neumann series of C-RBP run at this model's fixed points?

RBP's gradient is Σ_k (Jᵀ)ᵏ v at the fixed point h* (J = dF/dh). Three numbers say whether
that series runs, per input:

- `spectral_radius` ρ(J), by power iteration with VJPs (v ← Jᵀv): the series converges iff ρ < 1.
- `jacobian_norm` ‖J‖₂ = ‖Jᵀ‖₂, by power iteration on J Jᵀ (a VJP and a JVP per iteration):
  ‖J‖ > 1 > ρ is a non-normal contraction — the first terms grow, then the series converges.
- `max_column_sum` max(1ᵀJ), the quantity the LCP pushes below λ.

and `neumann`: the terms a unit random gradient gets under the default stop rule (and under the
public code's rule, for comparison), with the stop reason and ‖v_K‖/‖v₀‖.
The fixed point is reached by iterating until the relative state change is below `tol`.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .models.solver import fixed_point
from .training.lcp import per_sample_norm
from .training.rbp import DEFAULT_RULE, neumann_vjp


def _vjp(last: Tensor, prev: Tensor, v: Tensor) -> Tensor:
    return torch.autograd.grad(last, prev, v, retain_graph=True)[0]


def _jvp(last: Tensor, prev: Tensor, w: Tensor) -> Tensor:
    """J w by double backward: vjp(u) = Jᵀu is linear in u, so d(vjp(u)·w)/du = J w."""
    u = torch.zeros_like(last, requires_grad=True)
    (vj,) = torch.autograd.grad(last, prev, u, retain_graph=True, create_graph=True)
    return torch.autograd.grad(vj, u, w, retain_graph=True)[0]


def _public_rule(info) -> tuple[int, str]:
    """Terms and stop the public rule gives, read off a patient run's norms (they agree up to the
    first growing term, where the public rule stops), so the VJPs are not spent twice."""
    norms = info.v_norms
    grew = next((k for k in range(1, len(norms)) if norms[k] > norms[k - 1]), None)
    return (grew - 1, "growth") if grew is not None else (info.terms, info.stop)


@torch.no_grad()
def _fixed_point(model, ctx: Tensor, tol: float, max_iters: int) -> tuple[Tensor, int, list[float]]:
    """Each input's fixed point by the one solver: (states, most steps any input took, residuals)."""
    h, stats = fixed_point(model.step, ctx, model.init_state(ctx), max_iters=max_iters, tol=tol)
    return h, int(stats.iterations.max()), [float(f"{r:.3g}") for r in stats.residual.tolist()]


def _neumann_terms(last: Tensor, prev: Tensor, rand, steps: int) -> dict[str, list]:
    """Per sample: the Neumann terms a unit random gradient (on that sample only) gets under the default
    stop rule and under the public code's rule, the stop reasons and ‖v_K‖/‖v₀‖."""
    neumann: dict[str, list] = {"terms": [], "stop": [], "ratio": [], "terms_public": [], "stop_public": []}
    for i in range(prev.shape[0]):
        g0 = torch.zeros_like(prev)
        g0[i] = rand()[i]
        g0 = g0 / g0.norm()
        _, info = neumann_vjp(last, prev, g0, steps=steps, rule=DEFAULT_RULE)
        public_terms, public_stop = _public_rule(info)
        neumann["terms"].append(info.terms)
        neumann["stop"].append(info.stop)
        neumann["ratio"].append(float(f"{info.ratio:.3g}"))
        neumann["terms_public"].append(public_terms)
        neumann["stop_public"].append(public_stop)
    return neumann


def contraction_report(
    model,
    images: Tensor | None = None,
    *,
    inputs: int = 4,
    size: int = 64,
    tol: float = 1e-4,
    max_iters: int = 300,
    power_iters: int = 20,
    radius_iters: int = 40,
    neumann_steps: int = 15,
    seed: int = 0,
) -> dict[str, Any]:
    """Measure ρ(J), ‖J‖₂, max 1ᵀJ and the Neumann terms at the fixed points of `images`.

    ρ(J): `radius_iters` VJP power iterations (an estimate from below when eigenvalues cluster);
    ‖J‖₂: `power_iters` iterations of J Jᵀ, which converge fast here.

    Without `images`: `inputs` uniform random size x size images (seeded). Every random draw uses
    its own generator, so a report never changes a training run's random stream.
    """
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        gen = torch.Generator().manual_seed(seed)
        source = "given images"
        if images is None:
            images = torch.rand(inputs, model.in_channels, size, size, generator=gen)
            source = f"random {size}x{size}"
        images = images.to(device=param.device, dtype=param.dtype)
        with torch.no_grad():
            ctx = model.encode(images)
        h, iterations, residual = _fixed_point(model, ctx, tol, max_iters)
        with torch.enable_grad():
            prev = h.detach().requires_grad_()
            last = model.step(ctx, prev)
            rand = lambda: torch.randn(prev.shape, generator=gen).to(prev)  # noqa: E731
            # spectral radius: v <- Jᵀv; geometric mean of the growth over the second half
            v = rand()
            v = v / per_sample_norm(v)
            logs = []
            for _ in range(radius_iters):
                w = _vjp(last, prev, v)
                n = per_sample_norm(w)
                logs.append(n.flatten().log())
                v = w / n.clamp_min(1e-30)
            radius = torch.stack(logs[radius_iters // 2 :]).mean(0).exp()  # converges slower than ‖J‖
            # spectral norm: u <- J Jᵀ u; ‖Jᵀu‖ for the unit top singular vector u is σ_max
            u = rand()
            u = u / per_sample_norm(u)
            for _ in range(power_iters):
                w = _vjp(last, prev, u)
                sigma = per_sample_norm(w).flatten()
                u = _jvp(last, prev, w)
                u = u / per_sample_norm(u).clamp_min(1e-30)
            colsum = _vjp(last, prev, torch.ones_like(last)).flatten(1).amax(dim=1)
            neumann = _neumann_terms(last, prev, rand, neumann_steps)
    finally:
        model.train(was_training)
    r3 = lambda t: [float(f"{x:.4g}") for x in t.tolist()]  # noqa: E731
    return {
        "inputs": int(images.shape[0]),
        "images": source,
        "fixed_point": {"tol": tol, "max_iters": max_iters, "iterations": iterations, "residual": residual},
        "spectral_radius": r3(radius),
        "jacobian_norm": r3(sigma),
        "max_column_sum": r3(colsum),
        "neumann": {"rule": DEFAULT_RULE, "steps": neumann_steps, **neumann},
    }


def summary_line(report: dict[str, Any]) -> str:
    """One line for `crbp-deploy info`."""
    n = report["neumann"]
    return (
        f"at the fixed point of {report['inputs']} {report['images']} inputs "
        f"({report['fixed_point']['iterations']} steps, residual <= {max(report['fixed_point']['residual']):.2g}): "
        f"spectral radius {report['spectral_radius']}, ‖J‖₂ {report['jacobian_norm']}, "
        f"max 1ᵀJ {report['max_column_sum']}; Neumann terms of a unit gradient ({n['rule']} rule, "
        f"{n['steps']} max) {n['terms']} stop {n['stop']}; public rule {n['terms_public']}"
    )
