"""The Lipschitz Coefficient Penalty (LCP) of C-RBP (Linsley et al. 2020).

RBP's Neumann series converges only where F is contractive around its fixed point. The LCP
pushes it there cheaply: one vector-Jacobian product u = 1ᵀJ (J = d last / d prev) instead of
the full Jacobian, and penalty = ReLU(u − λ)², reduced to a scalar. `create_graph=True` keeps
the product in the autograd graph, so the penalty trains the parameters (double backward).
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


def lipschitz_penalty(last: Tensor, prev: Tensor, lam: float = DEFAULT_LAMBDA, reduction: str = DEFAULT_REDUCTION) -> Tensor:
    """Σ ReLU(1ᵀJ − λ)² reduced by `reduction` (see LCP_REDUCTIONS); differentiable in the parameters."""
    if reduction not in LCP_REDUCTIONS:
        raise InputError(f"lcp reduction must be one of {', '.join(LCP_REDUCTIONS)}, got {reduction!r}")
    excess = torch.relu(column_sums(last, prev) - lam) ** 2
    if reduction == "mean":
        return excess.mean()
    if reduction == "sum":
        return excess.sum()
    return excess.flatten(1).sum(dim=1).mean()
