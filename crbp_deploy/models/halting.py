"""Halting: when is a sample done? One rule per policy, decided per sample inside the solver.

The solver stops a sample when its state has converged (relative change <= tol), diverged, hit the
cap, or when its policy fires `patience` steps in a row:

- `tol`: nothing beyond convergence (today's rule; the policy of a card that records none);
- `estimate`: the contraction estimate of the distance left to the fixed point,
  rho/(1-rho) * r_t with rho = r_t / r_(t-1), is <= threshold;
- `stable`: the model's answer proxy (`answer_proxy(ctx, h)`, e.g. the semantic argmax) changed on
  at most a `threshold` fraction of its entries;
- `learned`: the model's halting head, reading the state change (`features`), says the answer is
  final with probability >= threshold.

Everything here is tensor arithmetic on the step's inputs and outputs, so it traces into the ONNX
Loop body exactly as it runs in eager mode (same features, same comparison, same iteration counts).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

POLICIES = ("tol", "estimate", "stable", "learned")
_EPS = 1e-8
POOL = 4  # local change is pooled over POOL x POOL state cells before its spatial maximum


def features(old: Tensor, new: Tensor, residual: Tensor, prev_residual: Tensor) -> Tensor:
    """[B, 2 + 2C] per-step features of a state update, scale-free (logs of ratios):
    log r_t, log rho_t, and per channel the mean and the local maximum of |new - old| relative to
    the channel's mean |new|. The local maximum sees a region still moving while the rest has settled,
    which the global residual averages away."""
    old32, new32 = old.detach().float(), new.detach().float()
    delta = (new32 - old32).abs()
    scale = new32.abs().mean(dim=(2, 3)) + _EPS
    mean_change = delta.mean(dim=(2, 3)) / scale
    pooled = F.avg_pool2d(delta, POOL, ceil_mode=True) if min(delta.shape[-2:]) >= POOL else delta
    local_change = pooled.amax(dim=(2, 3)) / scale
    rho = residual / prev_residual.clamp_min(_EPS)  # inf / inf never happens: prev is finite after step 1
    rho = torch.where(torch.isfinite(prev_residual), rho, torch.zeros_like(rho))
    scalars = torch.stack([_log(residual), _log(rho)], dim=1)
    return torch.cat([scalars, _log(mean_change), _log(local_change)], dim=1)


def _log(x: Tensor) -> Tensor:
    """log with a floor; clamp, not `x + eps`, which ONNX Runtime's graph optimiser was seen to drop."""
    return torch.log(x.clamp_min(_EPS))


def feature_count(channels: int) -> int:
    return 2 + 2 * channels


class HaltingHead(nn.Module):
    """Features -> logit of "this sample's answer is final" (an MLP over standardised features).

    Fitted on the frozen model's trajectories (`crbp_deploy.halting_fit`); saved in the checkpoint's
    weights under `halting_head.` with its shape in the card (`inference.halting_head`)."""

    def __init__(self, in_features: int, hidden: int = 32):
        super().__init__()
        self.in_features, self.hidden = in_features, hidden
        self.register_buffer("mean", torch.zeros(in_features))
        self.register_buffer("std", torch.ones(in_features))
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, feats: Tensor) -> Tensor:
        return self.net((feats - self.mean) / self.std).squeeze(1)

    def spec(self) -> dict[str, int]:
        return {"in_features": self.in_features, "hidden": self.hidden}


def changed_fraction(now: Tensor, before: Tensor) -> Tensor:
    """[B] the fraction of each sample's answer-proxy entries that differ (the `stable` policy's signal)."""
    return (now != before).float().flatten(1).mean(1)


def distance_left(residual: Tensor, prev_residual: Tensor) -> Tensor:
    """The contraction estimate rho/(1-rho) * r_t of the relative distance to the fixed point, with
    rho = r_t / r_(t-1); inf where it means nothing: before two steps, after the first step out of the
    zero state (r_(t-1) >= 1), or where the map is not contracting (rho >= 1)."""
    rho = residual / prev_residual.clamp_min(_EPS)
    known = (rho < 1) & torch.isfinite(prev_residual) & (prev_residual < 1)
    return torch.where(known, rho / (1 - rho).clamp_min(_EPS) * residual, torch.full_like(residual, float("inf")))


@dataclass(frozen=True)
class HaltRule:
    """The policy part of a budget as the solver runs it: name, threshold, patience."""

    policy: str = "tol"
    threshold: float | None = None
    patience: int = 1


def fires(rule: HaltRule, model, ctx, old: Tensor, new: Tensor, residual: Tensor, prev_residual: Tensor,
          threshold: Tensor) -> Tensor | None:
    """[B] bool: the policy says stop after this step (before patience); None for `tol`.

    `threshold` is a tensor so an exported graph can take it as an input."""
    if rule.policy == "estimate":
        return distance_left(residual, prev_residual) <= threshold
    if rule.policy == "stable":
        return changed_fraction(model.answer_proxy(ctx, new), model.answer_proxy(ctx, old)) <= threshold
    if rule.policy == "learned":
        return torch.sigmoid(model.halting_head(features(old, new, residual, prev_residual))) >= threshold
    return None
