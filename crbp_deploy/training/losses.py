"""Task losses and metrics: Pathfinder (focal / BCE, IoU) and box-free panoptic heads."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE = 255


def focal_loss(logits: Tensor, target: Tensor, *, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Per-pixel binary focal loss (Lin et al. 2017) on 2-class logits; the paper trains Pathfinder with it."""
    logp = F.log_softmax(logits, dim=1)
    logp_t = logp.gather(1, target.long().unsqueeze(1)).squeeze(1)
    p_t = logp_t.exp()
    weight = torch.where(target.bool(), torch.full_like(p_t, alpha), torch.full_like(p_t, 1 - alpha))
    return (-weight * (1 - p_t) ** gamma * logp_t).mean()


def bce_loss(logits: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(logits, target.long())


PATHFINDER_LOSSES = {"focal": focal_loss, "bce": bce_loss}


def iou_counts(logits: Tensor, target: Tensor) -> tuple[int, int]:
    """Intersection and union of the predicted and true contour pixels (summed over the batch)."""
    pred = logits.argmax(1).bool()
    true = target.bool()
    return int((pred & true).sum()), int((pred | true).sum())


def _per_sample_mean(values: Tensor, weight: Tensor) -> Tensor:
    """Weighted mean within each sample, then the mean over samples.

    Normalising per sample (not by the batch's pixel count) keeps the loss a mean of per-sample
    terms, so gradients averaged over data-parallel processes equal the single-process gradient.
    """
    values, weight = values.flatten(1), weight.flatten(1).to(values.dtype)
    return ((values * weight).sum(1) / weight.sum(1).clamp_min(1.0)).mean()


def panoptic_loss(
    outputs: dict[str, Tensor],
    targets: dict[str, Tensor],
    *,
    center_weight: float = 10.0,
    offset_weight: float = 0.1,
) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy on semantics (void/crowd ignored), BCE on the centre heatmap, L1 on thing offsets."""
    valid = targets["semantic"] != IGNORE
    ce = F.cross_entropy(outputs["semantic"], targets["semantic"].masked_fill(~valid, 0), reduction="none")
    semantic = _per_sample_mean(ce, valid)
    center = F.binary_cross_entropy_with_logits(outputs["center"], targets["center"])
    l1 = F.l1_loss(outputs["offset"], targets["offset"], reduction="none").sum(1)
    offset = _per_sample_mean(l1, targets["thing"])
    total = semantic + center_weight * center + offset_weight * offset
    return total, {"semantic": semantic.item(), "center": center.item(), "offset": offset.item()}
