"""The Lipschitz Coefficient Penalty (LCP) of C-RBP (Linsley et al. 2020).

RBP's Neumann series converges only where F is contractive around its fixed point. The LCP
pushes it there cheaply: one vector-Jacobian product u = 1ᵀJ (J = d last / d prev) instead of
the full Jacobian, and penalty = ReLU(u − λ)², reduced to a scalar. `create_graph=True` keeps
the product in the autograd graph, so the penalty trains the parameters (double backward).

The column sums bound nothing when J has entries of both signs: a Pathfinder model with every
column sum below 0.9 had ‖J‖₂ ≈ 2.4, ρ(J) ≈ 0.99 and a forward that never converged
(docs/pathfinder_claims.md §6). The "spectral" kind penalises an estimate of ρ(J) itself:
a few graph-free power iterations v ← Jᵀv per sample, then ReLU(‖Jᵀv‖/‖v‖ − λ)² with the
last product kept in the graph.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import InputError

#: How the per-element penalty is reduced to a scalar.
#: "mean":  mean over all elements (default; the Pathfinder code). Independent of batch size,
#:          image size and channels, so one weight means the same pressure on every model and
#:          resolution — the other two grow with the state size (4x at twice the image side).
#: "batch": sum over each sample's elements, mean over the batch (the panoptic code's sum, per sample);
#: "sum":   sum over all elements (the panoptic code; its weight 0.001 assumes this).
LCP_REDUCTIONS = ("mean", "batch", "sum")
#: What the penalty constrains: "columns" (the paper: every entry of 1ᵀJ <= λ) or "spectral"
#: (the power-iteration estimate of ρ(J) <= λ, one number per sample).
LCP_KINDS = ("columns", "spectral")
DEFAULT_KIND = "columns"
#: Graph-free power iterations before the recorded one (each one VJP).
SPECTRAL_POWER_ITERS = 4

#: Defaults shared by solve(), TrainConfig and the `train` CLI (a test checks they agree).
#: The weight is measured, not the paper's 10: in short runs (docs/contraction.md) weight 100
#: left the panoptic model's series stopping on growth in ~30% of the batches, 1000 in ~8%;
#: Goetschalckx et al. 2023 train hGRUs with C-RBP at 100-1000.
DEFAULT_REDUCTION = "mean"
DEFAULT_LAMBDA = 0.9
DEFAULT_WEIGHT = 1000.0


def column_sums(last: Tensor, prev: Tensor, *, create_graph: bool = True) -> Tensor:
    """u = 1ᵀ J, the column sums of J = d last / d prev, as one VJP (shaped like `prev`)."""
    (u,) = torch.autograd.grad(last, prev, torch.ones_like(last), create_graph=create_graph, retain_graph=True)
    return u


def per_sample_norm(t: Tensor) -> Tensor:
    """‖t_i‖ of each sample, shaped to broadcast against t."""
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def spectral_estimate(last: Tensor, prev: Tensor, iters: int = SPECTRAL_POWER_ITERS) -> Tensor:
    """Per sample ‖Jᵀv‖/‖v‖ after `iters` graph-free power iterations v ← Jᵀv from a random v: the
    growth along J's dominant direction, which tends to ρ(J); differentiable in the parameters."""
    v = torch.randn_like(prev)
    v = v / per_sample_norm(v).clamp_min(1e-30)
    for _ in range(iters):
        (w,) = torch.autograd.grad(last, prev, v, retain_graph=True)
        v = w / per_sample_norm(w).clamp_min(1e-30)
    (w,) = torch.autograd.grad(last, prev, v, create_graph=True, retain_graph=True)
    return w.flatten(1).norm(dim=1)  # v has unit norm per sample


def lipschitz_penalty(last: Tensor, prev: Tensor, lam: float = DEFAULT_LAMBDA, reduction: str = DEFAULT_REDUCTION,
                      kind: str = DEFAULT_KIND) -> Tensor:
    """Σ ReLU(1ᵀJ − λ)² (kind "columns") or ReLU(ρ̂(J) − λ)² per sample (kind "spectral"), reduced
    by `reduction` (see LCP_REDUCTIONS; "batch" and "mean" agree for one number per sample)."""
    if reduction not in LCP_REDUCTIONS:
        raise InputError(f"lcp reduction must be one of {', '.join(LCP_REDUCTIONS)}, got {reduction!r}")
    if kind not in LCP_KINDS:
        raise InputError(f"lcp kind must be one of {', '.join(LCP_KINDS)}, got {kind!r}")
    if kind == "spectral":
        excess = torch.relu(spectral_estimate(last, prev) - lam) ** 2
        return excess.sum() if reduction == "sum" else excess.mean()
    excess = torch.relu(column_sums(last, prev) - lam) ** 2
    if reduction == "mean":
        return excess.mean()
    if reduction == "sum":
        return excess.sum()
    return excess.flatten(1).sum(dim=1).mean()
