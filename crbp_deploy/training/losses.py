"""Task losses: Pathfinder (focal / BCE) and box-free panoptic heads (the metrics live in crbp_deploy.tasks)."""
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


def balanced_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Class-balanced cross-entropy (as in HED, Xie & Tu 2015): each image's contour and background
    pixels weigh half each. Why: the target is ~3-5% of a Pathfinder image, and unweighted BCE or
    focal loss first learn "all background" (docs/pathfinder_claims.md: no segmentation for ~160
    updates), which a short CPU run cannot afford. Measured since: it then settles on "every drawn
    pixel", because a distractor's pixels are a few percent of the background half and barely cost;
    one epoch of it, then `bce`, gave the first models above that answer (pathfinder_claims.md §5)."""
    ce = F.cross_entropy(logits, target.long(), reduction="none").flatten(1)
    on = target.flatten(1).bool()
    pos = (ce * on).sum(1) / on.sum(1).clamp_min(1)
    neg = (ce * ~on).sum(1) / (~on).sum(1).clamp_min(1)
    return (0.5 * (pos + neg)).mean()


PATHFINDER_LOSSES = {"focal": focal_loss, "bce": bce_loss, "balanced": balanced_loss}


def _per_sample_mean(values: Tensor, weight: Tensor) -> Tensor:
    """Weighted mean within each sample, then the mean over samples.

    Normalising per sample (not by the batch's pixel count) keeps the loss a mean of per-sample
    terms, so gradients averaged over data-parallel processes equal the single-process gradient.
    """
    values, weight = values.flatten(1), weight.flatten(1).to(values.dtype)
    return ((values * weight).sum(1) / weight.sum(1).clamp_min(1.0)).mean()


#: Margins of the discriminative loss: a pixel is pulled to within PULL_MARGIN of its instance's mean
#: embedding, means are pushed PUSH_MARGIN apart (De Brabandere et al. 2017 use 0.5 and 1.5 as half-margins).
PULL_MARGIN, PUSH_MARGIN = 0.5, 3.0


def discriminative_loss(embedding: Tensor, instance: Tensor) -> Tensor:
    """Pull each instance's pixels to its mean embedding, push the means of one image apart, keep them small.

    embedding [B, E, H, W]; instance int64 [B, H, W], 0 = no instance, k = the k-th instance of the image.
    Vectorised over the batch: the instances of all images are indexed as b * M + k.
    """
    b, e = embedding.shape[:2]
    m = int(instance.max()) + 1
    flat = (instance + m * torch.arange(b, device=instance.device).view(b, 1, 1)).flatten()
    pixels = embedding.permute(0, 2, 3, 1).reshape(-1, e).float()
    counts = torch.bincount(flat, minlength=b * m).float()
    sums = torch.zeros(b * m, e, device=pixels.device).index_add_(0, flat, pixels)
    means = sums / counts.clamp_min(1.0)[:, None]
    present = (counts > 0).view(b, m).clone()
    present[:, 0] = False  # 0 is "no instance"
    thing = instance.flatten() > 0
    dist = (pixels - means[flat]).norm(dim=1)
    pull_px = F.relu(dist - PULL_MARGIN).pow(2) * thing
    pull_inst = torch.zeros(b * m, device=pixels.device).index_add_(0, flat, pull_px) / counts.clamp_min(1.0)
    n_inst = present.sum(1).clamp_min(1)
    pull = ((pull_inst.view(b, m) * present).sum(1) / n_inst).mean()
    mu = means.view(b, m, e)
    pair = present[:, :, None] & present[:, None, :] & ~torch.eye(m, dtype=torch.bool, device=present.device)
    gap = torch.cdist(mu, mu)
    push_pairs = F.relu(PUSH_MARGIN - gap).pow(2) * pair
    push = (push_pairs.sum((1, 2)) / pair.sum((1, 2)).clamp_min(1)).mean()
    reg = ((mu.norm(dim=2) * present).sum(1) / n_inst).mean()
    return pull + push + 1e-3 * reg


def panoptic_loss(
    outputs: dict[str, Tensor],
    targets: dict[str, Tensor],
    *,
    center_weight: float = 10.0,
    offset_weight: float = 0.1,
) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy on semantics (void/crowd ignored), plus the instance heads' loss: BCE on the centre
    heatmap and L1 on thing offsets, or the discriminative loss on the embedding."""
    valid = targets["semantic"] != IGNORE
    ce = F.cross_entropy(outputs["semantic"], targets["semantic"].masked_fill(~valid, 0), reduction="none")
    semantic = _per_sample_mean(ce, valid)
    if "embedding" in outputs:
        embed = discriminative_loss(outputs["embedding"], targets["instance"])
        return semantic + embed, {"semantic": semantic.item(), "embedding": embed.item()}
    center = F.binary_cross_entropy_with_logits(outputs["center"], targets["center"])
    l1 = F.l1_loss(outputs["offset"], targets["offset"], reduction="none").sum(1)
    offset = _per_sample_mean(l1, targets["thing"])
    total = semantic + center_weight * center + offset_weight * offset
    return total, {"semantic": semantic.item(), "center": center.item(), "offset": offset.item()}
