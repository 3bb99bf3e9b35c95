"""Quality against steps, per image: the trace every halting policy is judged on.

One pass runs each held-out image for `steps` solver steps and decodes its answer after every step.
Because the solver is per sample (an image's path never depends on its batch), the trace answers
"what would this image have scored had it stopped at step t" for every t at once, so a policy's
quality and cost are a lookup, not a rerun:

- `Trace.score(stops)`: the task quality (PQ / IoU x 100, in points) with image i stopped at
  `stops[i]`, and the mean steps;
- `Trace.oracle()`: each image stopped at the earliest step within `slack` of its own best (the
  limit no causal policy beats);
- the per-step halting features (`models.halting.features`) recorded next to the quality, for the
  learned head to be fitted on.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import os

import numpy as np
import torch

from .models.halting import distance_left, features as halting_features
from .models.solver import relative_change

ORACLE_SLACK = 0.01  # image quality (fraction): the oracle stops within 1 image-PQ point of the image's best


@dataclass
class Trace:
    """Per image (N) and step (T, 1-based step t at index t-1): the counts that make the task quality,
    the residual, the policy signals and the halting features."""

    task: str
    metric: str
    counts: np.ndarray  # panoptic: [N, T, K, 4] (iou, tp, fp, fn) per category; pathfinder: [N, T, 3] (tp, fp, fn) pixels
    residual: np.ndarray  # [N, T]
    features: np.ndarray  # [N, T, F]
    proxy_change: np.ndarray  # [N, T]: fraction of the answer proxy that changed at this step
    image_quality: np.ndarray  # [N, T] in [0, 1]
    categories: list = field(default_factory=list)

    @property
    def steps(self) -> int:
        return self.residual.shape[1]

    def score(self, stops: Sequence[int] | np.ndarray) -> tuple[float, float]:
        """(quality in points, mean steps) with image i stopped after stops[i] steps."""
        stops = np.clip(np.asarray(stops, dtype=np.int64), 1, self.steps)
        picked = self.counts[np.arange(len(stops)), stops - 1]
        return _quality(self.task, picked), float(stops.mean())

    def fixed(self, n: int) -> tuple[float, float]:
        return self.score(np.full(self.residual.shape[0], n))

    def oracle(self, slack: float = ORACLE_SLACK) -> np.ndarray:
        """Each image's earliest step whose image quality is within `slack` of its best."""
        q = self.image_quality
        return np.argmax(q >= q.max(axis=1, keepdims=True) - slack, axis=1) + 1

    def done_labels(self, slack: float = ORACLE_SLACK) -> np.ndarray:
        """[N, T] 1 where the image's answer is final (at or past its oracle step): the learned head's target."""
        return (np.arange(1, self.steps + 1)[None, :] >= self.oracle(slack)[:, None]).astype(np.float32)


def _quality(task: str, picked: np.ndarray) -> float:
    if task == "pathfinder":
        tp, fp, fn = picked.sum(axis=0)
        return 100.0 * float(tp / (tp + fp + fn)) if tp + fp + fn else 100.0
    totals = picked.sum(axis=0)  # [K, 4]
    seen = totals[:, 1] + totals[:, 2] + totals[:, 3] > 0
    n = totals[:, 1] + 0.5 * (totals[:, 2] + totals[:, 3])
    pq = np.where(n > 0, totals[:, 0] / np.maximum(n, 1e-12), 0.0)
    return 100.0 * float(pq[seen].mean()) if seen.any() else 0.0


def _image_quality(task: str, counts: np.ndarray) -> np.ndarray:
    """[N, T] per-image quality in [0, 1] (image PQ over the categories it has, or image IoU)."""
    if task == "pathfinder":
        total = counts.sum(-1)
        return np.where(total > 0, counts[..., 0] / np.maximum(total, 1.0), 1.0)
    seen = counts[..., 1] + counts[..., 2] + counts[..., 3] > 0
    n = counts[..., 1] + 0.5 * (counts[..., 2] + counts[..., 3])
    pq = np.where(n > 0, counts[..., 0] / np.maximum(n, 1e-12), 0.0)
    return np.where(seen.any(-1), (pq * seen).sum(-1) / np.maximum(seen.sum(-1), 1), 1.0)


@torch.no_grad()
def trace(model, batches, decode: Callable[[dict, Any], np.ndarray], *, steps: int, task: str, metric: str,
          categories: Sequence[Any] = (), progress: Callable[[int], Any] | None = None) -> Trace:
    """Run every batch `steps` steps; after each step read out, decode and count against the truth.

    `batches` yields (images [B, C, H, W] float, truth); `decode(heads, truth)` -> [B, ...] counts of
    one step (see `Trace.counts`).
    """
    counts, residual, feats, proxy = [], [], [], []
    for images, truth in batches:
        ctx = model.encode(images)
        h = model.init_state(ctx)
        prev_r = torch.full((images.shape[0],), float("inf"))
        prev_proxy = model.answer_proxy(ctx, h) if hasattr(model, "answer_proxy") else None
        c_b, r_b, f_b, p_b = [], [], [], []
        for _ in range(steps):
            new = model.step(ctx, h)
            r = relative_change(new, h)
            f_b.append(halting_features(h, new, r, prev_r).numpy())
            if prev_proxy is not None:
                now = model.answer_proxy(ctx, new)
                p_b.append((now != prev_proxy).float().flatten(1).mean(1).numpy())
                prev_proxy = now
            else:
                p_b.append(np.zeros(images.shape[0], dtype=np.float32))
            h, prev_r = new, r
            c_b.append(decode(model.readout(ctx, h), truth))
            r_b.append(r.numpy())
        counts.append(np.stack(c_b, 1))
        residual.append(np.stack(r_b, 1))
        feats.append(np.stack(f_b, 1))
        proxy.append(np.stack(p_b, 1))
        if progress:
            progress(images.shape[0])
    counts_a = np.concatenate(counts)
    return Trace(task=task, metric=metric, counts=counts_a, residual=np.concatenate(residual),
                 features=np.concatenate(feats), proxy_change=np.concatenate(proxy),
                 image_quality=_image_quality(task, counts_a), categories=list(categories))


def policy_signal(trace: Trace, policy: str, head=None) -> np.ndarray | None:
    """[N, T] what the policy compares with its threshold at each step (None for tol), computed with
    the same float32 arithmetic as `models.halting.fires`."""
    r = torch.from_numpy(trace.residual.astype(np.float32))
    if policy == "estimate":
        prev = torch.cat([torch.full_like(r[:, :1], float("inf")), r[:, :-1]], dim=1)
        return distance_left(r, prev).numpy()
    if policy == "stable":
        return trace.proxy_change
    if policy == "learned":
        if head is None:
            raise ValueError("the learned policy needs a halting head")
        feats = torch.from_numpy(trace.features.astype(np.float32))
        with torch.no_grad():
            return torch.sigmoid(head(feats.flatten(0, 1))).view(feats.shape[:2]).numpy()
    return None


def simulate(trace: Trace, *, tol: float, cap: int, policy: str = "tol", threshold: float | None = None,
             patience: int = 1, signal: np.ndarray | None = None) -> np.ndarray:
    """Each image's step count under a budget, exactly as the solver decides it (`models.solver.advance`):
    stop at the first step whose residual is <= tol or not finite, or whose policy has fired `patience`
    steps in a row, else at the cap. `signal`: `policy_signal` (pass it to reuse across thresholds)."""
    cap = min(int(cap), trace.steps)
    r = trace.residual[:, :cap].astype(np.float32)
    stop = (r <= np.float32(tol)) | ~np.isfinite(r)
    if policy != "tol":
        sig = (policy_signal(trace, policy) if signal is None else signal)[:, :cap]
        fired = sig >= threshold if policy == "learned" else sig <= threshold
        streak = np.zeros(r.shape[0], dtype=np.int64)
        held = np.zeros_like(stop)
        for t in range(cap):
            streak = np.where(fired[:, t], streak + 1, 0)
            held[:, t] = streak >= patience
        stop |= held
    any_stop = stop.any(axis=1)
    return np.where(any_stop, stop.argmax(axis=1) + 1, cap)


def _panoptic_io(model, dataset, limit: int, batch: int):
    """Batches of (images, truth) and the per-step decoder for a COCO panoptic split."""
    from .modelcard import ModelCard
    from .panoptic.postprocess import postprocess
    from .panoptic.pq import match_image

    card = ModelCard.of(model)
    cats, post = card.categories, card.postprocess
    ids = [int(c["id"]) for c in cats]

    def batches():
        for start in range(0, limit, batch):
            items = [dataset.load(i) for i in range(start, min(start + batch, limit))]
            rgb = np.stack([r for r, _, _ in items]).astype(np.float32) / 255.0
            yield torch.from_numpy(rgb).permute(0, 3, 1, 2).contiguous(), [(i, s) for _, i, s in items]

    def decode(heads, truth):
        out = np.zeros((len(truth), len(ids), 4))
        for i, ((pred_ids, pred_segs), (gt_ids, gt_segs)) in enumerate(zip(postprocess(heads, cats, post), truth)):
            stats = match_image(gt_ids, gt_segs, pred_ids, pred_segs, set(ids))
            for k, c in enumerate(ids):
                if c in stats:
                    out[i, k] = (stats[c].iou, stats[c].tp, stats[c].fp, stats[c].fn)
        return out

    return batches(), decode, cats


def _pathfinder_io(model, dataset, limit: int, batch: int):
    from .tasks.pathfinder import pixel_counts

    def batches():
        for start in range(0, limit, batch):
            items = [dataset.load(i) for i in range(start, min(start + batch, limit))]
            yield torch.from_numpy(np.stack([im for im, _ in items])[:, None]), np.stack([m for _, m in items])

    def decode(heads, truth):
        return pixel_counts(heads["logits"].argmax(dim=1) == 1, truth).astype(np.float64)

    return batches(), decode, []


def trace_split(model, data: str | os.PathLike, *, split: str = "val", steps: int, limit: int = 0, batch: int = 16,
                progress: Callable[[int], Any] | None = None) -> Trace:
    """`trace` of a model on a held-out split of its task's data (first `limit` images; 0 = all)."""
    from .tasks import task_of

    task = task_of(model)
    dataset = task.open(data, split)
    n = min(len(dataset), limit) if limit else len(dataset)
    io = _panoptic_io if task.name == "panoptic" else _pathfinder_io
    batches, decode, cats = io(model, dataset, n, batch)
    return trace(model.eval(), batches, decode, steps=steps, task=task.name, metric=task.metric, categories=cats,
                 progress=progress)
