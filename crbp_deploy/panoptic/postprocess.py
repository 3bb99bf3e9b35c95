"""Box-free panoptic grouping: semantic logits + center heatmap + offsets -> COCO panoptic segments.

Two halves, split where the data stops having a fixed shape:

- `panoptic_labels` is tensor-only (no loops, `.item()`, numpy or data-dependent shapes), so the
  grouping can live inside an exported ONNX / TensorRT graph (Panoptic-DeepLab style: center NMS by
  max-pooling, a fixed top-k of centers, each thing pixel joins the center its offset points nearest to);
- `to_coco` runs on the host (numpy) and turns one image's labels into a COCO panoptic id map and its
  `segments_info` (variable-length by nature).

Models with an embedding head (`grouping="embedding"`) are grouped by `embedding_labels` instead: a
mean-shift over the thing pixels' embeddings, on the host (its loop count depends on the data, so it
does not go into a graph). Both return the same (labels, scores), so `to_coco` serves either.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import StrictConfig
from ..errors import ConfigError, InputError


@dataclass(frozen=True)
class PostprocessConfig(StrictConfig):
    """Grouping and filtering options (defaults follow Panoptic-DeepLab's COCO settings where it has one)."""

    center_threshold: float = 0.1  # on sigmoid(center); weaker peaks are not instances
    nms_kernel: int = 7  # odd max-pool window for center NMS
    top_k: int = 32  # fixed number of center slots per image (instances 1..top_k)
    label_divisor: int = 1000  # label = class_index * label_divisor + instance
    min_area: int = 32  # segments with fewer pixels become void
    min_stuff_area: int | None = None  # separate floor for stuff (Panoptic-DeepLab: 2048 on COCO); None = min_area
    bandwidth: float = 1.5  # embedding grouping: mean-shift radius (half the trained push margin)

    def validate(self) -> None:
        if not 0.0 < self.center_threshold < 1.0:
            raise ConfigError(f"center_threshold must be in (0, 1), got {self.center_threshold}")
        if self.nms_kernel < 1 or self.nms_kernel % 2 == 0:
            raise ConfigError(f"nms_kernel must be a positive odd integer, got {self.nms_kernel}")
        if self.top_k < 1:
            raise ConfigError(f"top_k must be >= 1, got {self.top_k}")
        if self.label_divisor <= self.top_k:
            raise ConfigError(f"label_divisor ({self.label_divisor}) must exceed top_k ({self.top_k})")
        if self.min_area < 0 or (self.min_stuff_area is not None and self.min_stuff_area < 0):
            raise ConfigError("min_area and min_stuff_area must be >= 0")
        if not self.bandwidth > 0:
            raise ConfigError(f"bandwidth must be > 0, got {self.bandwidth}")

    def grouping(self) -> dict[str, Any]:
        """The keyword arguments of `panoptic_labels`."""
        return {k: getattr(self, k) for k in ("center_threshold", "nms_kernel", "top_k", "label_divisor")}


def check_categories(categories: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """COCO category dicts with unique int `id` and an `isthing` flag, in class-index order."""
    cats = list(categories)
    if not cats:
        raise InputError("categories is empty")
    for i, c in enumerate(cats):
        if not isinstance(c, Mapping) or "id" not in c or "isthing" not in c:
            raise InputError(f"categories[{i}] must be a dict with 'id' and 'isthing', got {c!r}")
    ids = [c["id"] for c in cats]
    if len(set(ids)) != len(ids):
        raise InputError(f"category ids are not unique: {ids}")
    return cats


def thing_mask_of(categories: Sequence[Mapping[str, Any]]) -> Tensor:
    """Bool[K]: which class indices are things."""
    return torch.tensor([bool(c["isthing"]) for c in check_categories(categories)], dtype=torch.bool)


def panoptic_labels(
    semantic: Tensor,
    center: Tensor,
    offset: Tensor,
    thing_mask: Tensor,
    *,
    center_threshold: float = 0.1,
    nms_kernel: int = 7,
    top_k: int = 32,
    label_divisor: int = 1000,
) -> tuple[Tensor, Tensor]:
    """Group heads into per-pixel panoptic labels, with vectorised, exportable ops only.

    semantic [B, K, H, W] logits, center [B, 1, H, W] logits, offset [B, 2, H, W] (dy, dx in pixels
    from each pixel to its instance center), thing_mask bool [K].

    Returns `(labels, center_scores)`:
      labels int64 [B, H, W] = class_index * label_divisor + instance, instance in 1..top_k for thing
        pixels (the rank of their center by score) and 0 for stuff. A thing pixel in an image with no
        valid center keeps instance 0; `to_coco` makes such pixels void (no instance to give them).
      center_scores [B, top_k]: sigmoid(center) of each slot's center, 0 for empty slots.

    Peaks are found on the logits (sigmoid is monotonic, but saturates to 1.0 in float32, which would
    make neighbouring strong peaks tie); a pixel is a center if it equals the max of its nms_kernel
    window and sigmoid(logit) > center_threshold. Every thing pixel joins the valid center nearest to
    pixel + offset (no distance cap, as in Panoptic-DeepLab); the semantic class of an instance is
    decided later by majority vote in `to_coco`. Memory: two float [B, top_k, H, W] buffers.
    """
    if semantic.dim() != 4 or center.dim() != 4 or offset.dim() != 4:
        raise InputError("semantic, center and offset must be B x C x H x W")
    if center.shape[1] != 1 or offset.shape[1] != 2:
        raise InputError(f"center must have 1 channel and offset 2, got {center.shape[1]} and {offset.shape[1]}")
    if thing_mask.dim() != 1 or thing_mask.shape[0] != semantic.shape[1]:
        raise InputError(f"thing_mask must be [K={semantic.shape[1]}], got {tuple(thing_mask.shape)}")
    if not 0.0 < center_threshold < 1.0:
        raise InputError(f"center_threshold must be in (0, 1), got {center_threshold}")
    if nms_kernel < 1 or nms_kernel % 2 == 0:
        raise InputError(f"nms_kernel must be a positive odd integer, got {nms_kernel}")
    if top_k < 1 or label_divisor <= top_k:
        raise InputError(f"need 1 <= top_k < label_divisor, got top_k={top_k}, label_divisor={label_divisor}")

    _, _, h, w = semantic.shape
    cls = semantic.argmax(dim=1)  # [B, H, W]
    is_thing = thing_mask.to(torch.int64)[cls] > 0

    # Center NMS on logits; padding the flat scores with -inf gives topk enough slots on tiny images.
    logit_threshold = math.log(center_threshold / (1.0 - center_threshold))
    pooled = F.max_pool2d(center, nms_kernel, stride=1, padding=nms_kernel // 2)
    peak = (center == pooled) & (center > logit_threshold)
    flat = torch.where(peak, center, torch.full_like(center, -math.inf)).flatten(1)
    flat = F.pad(flat, (0, top_k), value=-math.inf)
    top, index = torch.topk(flat, top_k, dim=1)  # [B, k], sorted by score
    valid = top > logit_threshold
    scores = torch.where(valid, torch.sigmoid(top), torch.zeros_like(top))

    # Nearest valid center to pixel + offset, for all pixels and slots at once: [B, k, H, W].
    # Slot coordinates by gathering from coordinate grids: exporters lower integer floor-division
    # to float32 Div + Floor, which is off by one past 2^24 pixels.
    row = torch.arange(h, dtype=offset.dtype, device=offset.device)
    col = torch.arange(w, dtype=offset.dtype, device=offset.device)
    grid_y = F.pad(row[:, None].expand(h, w).reshape(-1), (0, top_k))
    grid_x = F.pad(col[None, :].expand(h, w).reshape(-1), (0, top_k))
    cy = grid_y[index][:, :, None, None]
    cx = grid_x[index][:, :, None, None]
    ys = row[None, :, None] + offset[:, 0]
    xs = col[None, None, :] + offset[:, 1]
    # In place where possible: each fresh [B, k, H, W] buffer costs more in page faults than in math.
    dist = ys[:, None] - cy
    dist.mul_(dist)
    dx = xs[:, None] - cx
    dist.add_(dx.mul_(dx))  # not addcmul: a fused multiply-add would round differently from exported graphs
    dist.masked_fill_(~valid[:, :, None, None], math.inf)
    nearest = dist.argmin(dim=1)  # [B, H, W]

    has_center = valid.any(dim=1)[:, None, None]
    instance = torch.where(is_thing & has_center, nearest + 1, torch.zeros_like(nearest))
    return cls * label_divisor + instance, scores


MEAN_SHIFT_ROUNDS = 10
DENSITY_SAMPLE = 256  # seed candidates are scored against this many evenly spaced free pixels
SEEDS_PER_SLOT = 4


def embedding_labels(
    semantic: Tensor,
    embedding: Tensor,
    thing_mask: Tensor,
    *,
    bandwidth: float = 1.5,
    top_k: int = 32,
    label_divisor: int = 1000,
    min_area: int = 32,
) -> tuple[Tensor, Tensor]:
    """Group thing pixels by their embeddings; returns `(labels, scores)` as `panoptic_labels` does.

    Per image: seed at the free thing pixel with the most free neighbours within `bandwidth` (counted
    against an evenly spaced sample), mean-shift the seed to its mode with a flat kernel, and give
    every free pixel within `bandwidth` of the mode the next instance number. Clusters under
    `min_area` pixels are left without an instance (void, as `to_coco` makes them), so boundary
    pixels with stray embeddings do not take instance slots. At most `top_k` instances and
    SEEDS_PER_SLOT * top_k seeds (a noisy embedding cannot make the loop run once per pixel);
    score = mean (1 - distance / bandwidth) of the members.
    """
    if semantic.dim() != 4 or embedding.dim() != 4 or embedding.shape[-2:] != semantic.shape[-2:]:
        raise InputError("semantic and embedding must be B x C x H x W of the same size")
    if thing_mask.dim() != 1 or thing_mask.shape[0] != semantic.shape[1]:
        raise InputError(f"thing_mask must be [K={semantic.shape[1]}], got {tuple(thing_mask.shape)}")
    if not bandwidth > 0 or top_k < 1 or label_divisor <= top_k:
        raise InputError(f"need bandwidth > 0 and 1 <= top_k < label_divisor, got {bandwidth}, {top_k}, {label_divisor}")
    cls = semantic.argmax(dim=1)
    is_thing = thing_mask.to(cls.device)[cls]
    instance = torch.zeros_like(cls)
    scores = torch.zeros(cls.shape[0], top_k)
    for b in range(cls.shape[0]):
        where = is_thing[b].flatten().nonzero().flatten()
        emb = embedding[b].flatten(1).t()[where].float()  # n x E
        label = torch.zeros(len(where), dtype=torch.int64, device=emb.device)
        free = torch.ones(len(where), dtype=torch.bool, device=emb.device)
        slot = 0
        for _ in range(SEEDS_PER_SLOT * top_k):
            if slot == top_k or int(free.sum()) < max(min_area, 1):
                break
            pool = free.nonzero().flatten()
            sample = pool[:: max(1, len(pool) // DENSITY_SAMPLE)]
            density = (torch.cdist(emb[pool], emb[sample]) < bandwidth).sum(1)
            mode = emb[pool[density.argmax()]]
            for _ in range(MEAN_SHIFT_ROUNDS):
                near = free & ((emb - mode).norm(dim=1) < bandwidth)
                moved = emb[near].mean(0)
                if torch.equal(moved, mode):
                    break
                mode = moved
            dist = (emb - mode).norm(dim=1)
            members = free & (dist < bandwidth)
            if not bool(members.any()):  # the mode drifted off every free pixel: take the seed alone
                members = torch.zeros_like(free)
                members[pool[density.argmax()]] = True
            free &= ~members
            if int(members.sum()) < min_area:
                continue
            slot += 1
            label[members] = slot
            scores[b, slot - 1] = float((1 - dist[members] / bandwidth).clamp_min(0).mean())
        instance[b].view(-1)[where] = label
    return cls * label_divisor + instance, scores


def _numpy(x: Any, name: str) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except Exception as exc:
        raise InputError(f"{name} is not an array: {exc}") from exc


def _bbox(mask: np.ndarray) -> list[int]:
    """COCO [x, y, width, height] of a boolean mask, in whole pixels (width = x_max - x_min + 1)."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


def to_coco(
    labels: Any,
    semantic_probs: Any,
    center_scores: Any,
    categories: Sequence[Mapping[str, Any]],
    *,
    label_divisor: int = 1000,
    min_area: int = 32,
    min_stuff_area: int | None = None,
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """One image's labels [H, W] -> (pan_ids int64 [H, W], segments_info), COCO panoptic style.

    semantic_probs [K, H, W] are class probabilities (softmax of the semantic logits), center_scores
    [top_k] the slot scores from `panoptic_labels`. Things: one segment per instance number, its class
    the majority of the thing classes of its pixels. Stuff: one segment per class. Thing pixels without
    an instance, and segments smaller than min_area (min_stuff_area for stuff), are void (id 0).
    Segment ids are 1..n. Score: things = center score x mean probability of the voted class over the
    segment; stuff = mean probability of its class over the segment.
    """
    cats = check_categories(categories)
    labels = _numpy(labels, "labels").astype(np.int64, copy=False)
    probs = _numpy(semantic_probs, "semantic_probs")
    scores = _numpy(center_scores, "center_scores").reshape(-1)
    k = len(cats)
    if labels.ndim != 2:
        raise InputError(f"labels must be H x W, got shape {labels.shape}")
    if probs.shape != (k, *labels.shape):
        raise InputError(f"semantic_probs must be [K={k}, {labels.shape[0]}, {labels.shape[1]}], got {probs.shape}")
    cls = labels // label_divisor
    inst = labels % label_divisor
    if labels.size and (labels.min() < 0 or cls.max() >= k):
        raise InputError(f"labels hold classes outside 0..{k - 1} (label_divisor={label_divisor})")
    if inst.size and inst.max() > scores.size:
        raise InputError(f"labels hold instance {inst.max()} but there are only {scores.size} center scores")
    stuff_floor = min_area if min_stuff_area is None else min_stuff_area

    isthing = np.array([bool(c["isthing"]) for c in cats])
    thing_px = isthing[cls]
    thing_inst = np.where(thing_px, inst, 0)
    stuff_cls = np.where(thing_px, -1, cls)

    pan = np.zeros(labels.shape, dtype=np.int64)
    segments: list[dict[str, Any]] = []

    def add(mask: np.ndarray, c: int, score: float) -> None:
        sid = len(segments) + 1
        pan[mask] = sid
        segments.append({
            "id": sid,
            "category_id": int(cats[c]["id"]),
            "isthing": int(bool(cats[c]["isthing"])),
            "area": int(mask.sum()),
            "bbox": _bbox(mask),
            "score": float(score),
        })

    for n in np.unique(thing_inst[thing_inst > 0]):
        mask = thing_inst == n
        if mask.sum() < min_area:
            continue
        c = int(np.bincount(cls[mask], minlength=k).argmax())
        add(mask, c, float(scores[n - 1]) * float(probs[c][mask].mean()))
    for c in np.unique(stuff_cls[stuff_cls >= 0]):
        mask = stuff_cls == c
        if mask.sum() < stuff_floor:
            continue
        add(mask, int(c), float(probs[c][mask].mean()))
    return pan, segments


def postprocess(
    heads: Mapping[str, Tensor],
    categories: Sequence[Mapping[str, Any]],
    config: PostprocessConfig | None = None,
    **opts: Any,
) -> list[tuple[np.ndarray, list[dict[str, Any]]]]:
    """Model heads for a batch -> [(pan_ids, segments_info)] per image; opts are PostprocessConfig keys."""
    if config is not None and opts:
        raise ConfigError("give either config or keyword options, not both")
    cfg = config or PostprocessConfig.from_dict(opts)
    need = ("semantic", "embedding") if "embedding" in heads else ("semantic", "center", "offset")
    missing = [key for key in need if key not in heads]
    if missing:
        raise InputError(f"heads lack {', '.join(missing)}; got {', '.join(heads)}")
    semantic = heads["semantic"]
    thing_mask = thing_mask_of(categories).to(semantic.device)
    with torch.no_grad():
        if "embedding" in heads:
            labels, scores = embedding_labels(semantic, heads["embedding"], thing_mask, bandwidth=cfg.bandwidth,
                                              top_k=cfg.top_k, label_divisor=cfg.label_divisor, min_area=cfg.min_area)
        else:
            labels, scores = panoptic_labels(semantic, heads["center"], heads["offset"], thing_mask, **cfg.grouping())
        probs = torch.softmax(semantic.float(), dim=1)
    return [
        to_coco(labels[i], probs[i], scores[i], categories, label_divisor=cfg.label_divisor,
                min_area=cfg.min_area, min_stuff_area=cfg.min_stuff_area)
        for i in range(labels.shape[0])
    ]
