"""Pathfinder evaluation: IoU and F1 overall and per contour length, iterations per length, and
Spearman(length, iterations) per image -- does the model spend more steps on longer contours?

IoU and F1 are pooled over pixels (the sums of true positives, false positives and false negatives
over the images, as the training loop's IoU), overall and within each length. A prediction is the
argmax of the model's `logits` head (class 1 = on the marked contour).
"""
from __future__ import annotations

import math
import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from rich.progress import Progress
from rich.table import Table

from .errors import InputError
from .panoptic.evaluate import iteration_stats

EVAL_BATCH = 32


def open_pathfinder(data: str | os.PathLike, split: str = "val"):
    """A folder written by `crbp-deploy data pathfinder` (or a root holding SPLIT/), with one clear
    error for a missing, empty or panoptic folder."""
    from .quality import open_data

    return open_data("pathfinder", data, split)


def model_runner(model) -> Callable[..., Mapping[str, Any]]:
    """`run(images, **budget) -> heads` for a PyTorch model (a runtime Backend has its own)."""
    model.eval()

    def run(images: torch.Tensor, **budget):
        with torch.no_grad():
            return model(images, **budget)

    return run


def average_ranks(values: Sequence[float]) -> np.ndarray:
    """Ranks 1..n, ties sharing the mean of their ranks (as Spearman's rho needs)."""
    x = np.asarray(values, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    sorted_x = x[order]
    start = 0
    for end in range(1, len(x) + 1):
        if end == len(x) or sorted_x[end] != sorted_x[start]:
            ranks[order[start:end]] = (start + end + 1) / 2  # mean of ranks start+1 .. end
            start = end
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (Pearson's r of average ranks); None when either side is constant."""
    if len(x) != len(y):
        raise ValueError(f"spearman: {len(x)} x values but {len(y)} y values")
    if len(x) < 2:
        return None
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float((rx**2).sum() * (ry**2).sum()))
    return None if denom == 0 else float((rx * ry).sum() / denom)


def pixel_counts(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Per image (N x H x W bool each): [true positives, false positives, false negatives]."""
    pred, true = pred.astype(bool), true.astype(bool)
    axes = tuple(range(1, pred.ndim))
    return np.stack([(pred & true).sum(axes), (pred & ~true).sum(axes), (~pred & true).sum(axes)], axis=1)


def scores(counts: np.ndarray) -> dict[str, float]:
    """Pooled IoU and F1 from per-image [tp, fp, fn] rows (1.0 when there is nothing to find and nothing found)."""
    tp, fp, fn = (float(v) for v in np.asarray(counts).reshape(-1, 3).sum(0))
    iou = tp / (tp + fp + fn) if tp + fp + fn else 1.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0
    return {"iou": iou, "f1": f1}


def score_images(counts: np.ndarray, lengths: Sequence[int], iterations: Sequence[int],
                 converged: Sequence[bool]) -> dict[str, Any]:
    """The result of an evaluation from its per-image records (see the module doc)."""
    counts, lengths, iterations = np.asarray(counts), np.asarray(lengths), np.asarray(iterations)
    per_length = {}
    for n in sorted(set(lengths.tolist())):
        sel = lengths == n
        it = iterations[sel].astype(np.float64)
        per_length[str(n)] = {
            "images": int(sel.sum()),
            **scores(counts[sel]),
            "mean_iterations": float(it.mean()),
            "median_iterations": float(np.median(it)),
        }
    return {
        "metric": "iou",
        "images": int(len(lengths)),
        **scores(counts),
        "per_length": per_length,
        "iterations": iteration_stats(iterations.tolist(), list(converged)),
        "spearman_length_iterations": spearman(lengths, iterations),
    }


def evaluate_segmenter(run: Callable[..., Mapping[str, Any]], folder, *, batch_size: int = EVAL_BATCH,
                       limit: int = 0, progress: bool = False, **budget) -> dict[str, Any]:
    """Run `run(images N x 1 x H x W, **budget) -> {logits, iterations, residual}` (a model or a
    Backend) over a Pathfinder folder and score it: IoU / F1 overall and per length, iterations."""
    n = min(len(folder), limit) if limit else len(folder)
    if n == 0:
        raise InputError("the dataset holds no images")
    tol = budget.get("tol") if budget.get("max_iters") is not None else None
    counts, iterations, converged = [], [], []
    with Progress(disable=not progress, transient=True) as bar:
        job = bar.add_task("evaluating", total=n)
        for start in range(0, n, batch_size):
            pairs = [folder.load(i) for i in range(start, min(start + batch_size, n))]
            images = torch.from_numpy(np.stack([p[0] for p in pairs]))[:, None]
            out = run(images, **budget)
            logits = np.asarray(out["logits"])
            counts.append(pixel_counts(logits.argmax(1) == 1, np.stack([p[1] for p in pairs])))
            it = np.asarray(out["iterations"]).astype(np.int64).reshape(-1)
            res = np.asarray(out["residual"], dtype=np.float64).reshape(-1)
            iterations += it.tolist()
            converged += (res <= tol).tolist() if tol is not None else [False] * len(it)
            bar.update(job, advance=len(pairs))
    result = score_images(np.concatenate(counts), folder.lengths[:n], iterations, converged)
    result["budget"] = dict(budget)
    return result


def format_table(result: Mapping[str, Any], title: str = "Pathfinder") -> Table:
    """IoU, F1 and iterations per contour length and overall."""
    table = Table(title=title)
    for col in ("length", "images", "IoU", "F1", "mean it.", "median it."):
        table.add_column(col, justify="right")
    for n, r in result["per_length"].items():
        table.add_row(n, str(r["images"]), f"{r['iou']:.4f}", f"{r['f1']:.4f}", f"{r['mean_iterations']:.2f}",
                      f"{r['median_iterations']:.0f}")
    it = result["iterations"]
    table.add_row("all", str(result["images"]), f"{result['iou']:.4f}", f"{result['f1']:.4f}", f"{it['mean']:.2f}",
                  f"{it['median']:.0f}", style="bold")
    return table
