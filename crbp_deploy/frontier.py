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

import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .models.halting import changed_fraction, distance_left, features as halting_features
from .models.solver import relative_change
from .tasks import TASKS, task_of

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

    @property
    def steps(self) -> int:
        return self.residual.shape[1]

    def score(self, stops: Sequence[int] | np.ndarray) -> tuple[float, float]:
        """(quality in points, mean steps) with image i stopped after stops[i] steps."""
        stops = np.clip(np.asarray(stops, dtype=np.int64), 1, self.steps)
        picked = self.counts[np.arange(len(stops)), stops - 1]
        return TASKS[self.task].counts_quality(picked), float(stops.mean())

    def fixed(self, n: int) -> tuple[float, float]:
        return self.score(np.full(self.residual.shape[0], n))

    def oracle(self, slack: float = ORACLE_SLACK) -> np.ndarray:
        """Each image's earliest step whose image quality is within `slack` of its best."""
        q = self.image_quality
        return np.argmax(q >= q.max(axis=1, keepdims=True) - slack, axis=1) + 1

    def done_labels(self, slack: float = ORACLE_SLACK) -> np.ndarray:
        """[N, T] 1 where the image's answer is final (at or past its oracle step): the learned head's target."""
        return (np.arange(1, self.steps + 1)[None, :] >= self.oracle(slack)[:, None]).astype(np.float32)


@torch.no_grad()
def trace(model, batches, decode: Callable[[dict, Any], np.ndarray], *, steps: int, task: str, metric: str,
          progress: Callable[[int], Any] | None = None) -> Trace:
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
                p_b.append(changed_fraction(now, prev_proxy).numpy())
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
                 image_quality=TASKS[task].image_quality(counts_a))


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


def trace_split(model, data: str | os.PathLike, *, split: str = "val", steps: int, limit: int = 0, batch: int = 16,
                progress: Callable[[int], Any] | None = None) -> Trace:
    """`trace` of a model on a held-out split of its task's data (first `limit` images; 0 = all)."""
    task = task_of(model)
    dataset = task.open(data, split)
    n = min(len(dataset), limit) if limit else len(dataset)
    batches, decode = task.trace_io(model, dataset, n, batch)
    return trace(model.eval(), batches, decode, steps=steps, task=task.name, metric=task.metric, progress=progress)
