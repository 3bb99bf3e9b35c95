"""Pathfinder: segment the marked contour; quality = IoU of the contour pixels (x 100 in points).

IoU and F1 are pooled over pixels (the sums of true positives, false positives and false negatives over
the images), overall and within each contour length; iterations are reported per length, with
Spearman(length, iterations) per image -- does the model spend more steps on longer contours? A
prediction is the argmax of the model's `logits` head (class 1 = on the marked contour).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from rich.progress import Progress
from rich.table import Table

from ..data.pathfinder import PathfinderConfig, PathfinderFolder, write_dataset
from ..training.losses import PATHFINDER_LOSSES
from .base import EVAL_BATCH, TaskBase, TrainingData, data_folder, first, iteration_line, iteration_stats, register

LENGTHS = (6, 9, 14, 20, 25)  # a generated held-out set mixes these (difficulty varies)


def average_ranks(values: Sequence[float]) -> np.ndarray:
    """Ranks 1..n, ties sharing the mean of their ranks (as Spearman's rho needs)."""
    _, inverse, counts = np.unique(np.asarray(values, dtype=np.float64), return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts + 1 + ends) / 2)[inverse]  # the mean of ranks end - count + 1 .. end


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


def pixel_counts(pred, true) -> np.ndarray:
    """Per image (N x H x W, bool or 0/1; NumPy or torch): [true positives, false positives, false negatives]."""
    pred, true = (np.asarray(v.cpu() if isinstance(v, torch.Tensor) else v).astype(bool) for v in (pred, true))
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
        per_length[str(n)] = {"images": int(sel.sum()), **scores(counts[sel]), "mean_iterations": float(it.mean()),
                              "median_iterations": float(np.median(it))}
    return {
        "metric": "iou",
        "images": int(len(lengths)),
        **scores(counts),
        "per_length": per_length,
        "iterations": iteration_stats(iterations.tolist(), list(converged)),
        "spearman_length_iterations": spearman(lengths, iterations),
    }


def as_tensors(folder) -> dict[str, torch.Tensor]:
    """A Pathfinder folder (as `open` gives it) in memory: images N x 1 x H x W, mask N x H x W, and
    each image's contour length (for the curriculum and per-length validation)."""
    pairs = [folder[i] for i in range(len(folder))]
    return {"images": torch.stack([p[0] for p in pairs]), "mask": torch.stack([p[1] for p in pairs]),
            "length": torch.tensor(folder.lengths, dtype=torch.int64)}


class PathfinderTask(TaskBase):
    name, metric, default_model = "pathfinder", "IoU", "hgru-pathfinder"
    eval_batch, parity_images = EVAL_BATCH, 0
    marker, label, how = ("index.json", "Pathfinder data (index.json)",
                          "a folder written by `crbp-deploy data pathfinder`")

    def open(self, data: str | os.PathLike, split: str = "val", *, targets: bool = False):
        base = data_folder(self, data, split)
        return self._checked(PathfinderFolder(base), base)

    def generate(self, folder: Path, count: int, size: int, seed: int) -> Path:
        write_dataset(folder, PathfinderConfig(length=LENGTHS[0], size=size), count, seed=seed, progress=False,
                      lengths=LENGTHS)
        return folder

    def runner(self, model, backend=None, source: str | None = None) -> Callable[..., Mapping[str, Any]]:
        """`run(images, **budget) -> heads`: the PyTorch model, or `backend` running it."""
        if backend is not None:
            return lambda images, **budget: backend.run(images.numpy(), **budget).outputs
        model.eval()

        def run(images: torch.Tensor, **budget):
            with torch.no_grad():
                return model(images, **budget)

        return run

    def trace_io(self, model, dataset, limit: int, batch: int):
        """Batches of (images, masks) and a decoder: one step's logits -> [B, 3] pixel counts (tp, fp, fn)."""
        def batches():
            for start in range(0, limit, batch):
                items = [dataset.load(i) for i in range(start, min(start + batch, limit))]
                yield torch.from_numpy(np.stack([im for im, _ in items])[:, None]), np.stack([m for _, m in items])

        def decode(heads, truth):
            return pixel_counts(heads["logits"].argmax(dim=1) == 1, truth).astype(np.float64)

        return batches(), decode

    def counts_quality(self, counts: np.ndarray) -> float:
        return 100.0 * scores(counts)["iou"]

    def image_quality(self, counts: np.ndarray) -> np.ndarray:
        total = counts.sum(-1)
        return np.where(total > 0, counts[..., 0] / np.maximum(total, 1.0), 1.0)

    def evaluate(self, runner, dataset, *, limit: int = 0, batch_size: int | None = None, progress: bool = False,
                 **budget) -> dict[str, Any]:
        """Run `runner(images N x 1 x H x W, **budget) -> {logits, iterations, residual}` over a Pathfinder
        folder: IoU / F1 overall and per length, iterations."""
        n, batch_size = first(dataset, limit), batch_size or self.eval_batch
        tol = budget.get("tol") if budget.get("max_iters") is not None else None
        counts, iterations, converged = [], [], []
        with Progress(disable=not progress, transient=True) as bar:
            job = bar.add_task("evaluating", total=n)
            for start in range(0, n, batch_size):
                pairs = [dataset.load(i) for i in range(start, min(start + batch_size, n))]
                out = runner(torch.from_numpy(np.stack([p[0] for p in pairs]))[:, None], **budget)
                counts.append(pixel_counts(np.asarray(out["logits"]).argmax(1) == 1, np.stack([p[1] for p in pairs])))
                it = np.asarray(out["iterations"]).astype(np.int64).reshape(-1)
                res = np.asarray(out["residual"], dtype=np.float64).reshape(-1)
                iterations += it.tolist()
                converged += (res <= tol).tolist() if tol is not None else [False] * len(it)
                bar.update(job, advance=len(pairs))
        result = score_images(np.concatenate(counts), dataset.lengths[:n], iterations, converged)
        result["budget"] = dict(budget)
        return result

    def quality(self, result: Mapping[str, Any]) -> float:
        return 100.0 * float(result["iou"])

    def details(self, result: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "f1": result["f1"],
            "per_length": {n: {"iou": r["iou"], "mean_iterations": r["mean_iterations"]}
                           for n, r in result["per_length"].items()},
            "spearman_length_iterations": result["spearman_length_iterations"],
        }

    def report(self, result: Mapping[str, Any], dataset, *, per_class: bool = False) -> list:
        """IoU, F1 and iterations per contour length and overall; the iterations line with Spearman."""
        table = Table(title=f"Pathfinder: {result['model']} on {result['data']}, budget {result['budget']}")
        for col in ("length", "images", "IoU", "F1", "mean it.", "median it."):
            table.add_column(col, justify="right")
        for n, r in result["per_length"].items():
            table.add_row(n, str(r["images"]), f"{r['iou']:.4f}", f"{r['f1']:.4f}", f"{r['mean_iterations']:.2f}",
                          f"{r['median_iterations']:.0f}")
        it, rho = result["iterations"], result["spearman_length_iterations"]
        table.add_row("all", str(result["images"]), f"{result['iou']:.4f}", f"{result['f1']:.4f}", f"{it['mean']:.2f}",
                      f"{it['median']:.0f}", style="bold")
        return [table, iteration_line(it) + "; Spearman(length, iterations) per image: "
                + ("n/a (constant)" if rho is None else f"{rho:.3f}")]

    def images(self, dataset, count: int) -> np.ndarray:
        return np.stack([dataset.load(i)[0] for i in range(min(count, len(dataset)))])[:, None]

    def training_data(self, cfg) -> TrainingData:
        """DATA/train + DATA/val (each written by `crbp-deploy data pathfinder`), or one folder split 90/10."""
        root = Path(cfg.data)
        if (root / "train").is_dir():
            train, val = (as_tensors(self.open(root / split)) for split in ("train", "val"))
        else:
            data = as_tensors(self.open(root))
            cut = len(data["images"]) - max(1, len(data["images"]) // 10)
            train, val = {k: v[:cut] for k, v in data.items()}, {k: v[cut:] for k, v in data.items()}
        return TrainingData(train, val, dict(cfg.model_config), {})

    def loss(self, outputs, batch, cfg):
        loss = PATHFINDER_LOSSES[cfg.loss](outputs["logits"], batch["mask"])
        return loss, {"iou": scores(pixel_counts(outputs["logits"].detach().argmax(1) == 1, batch["mask"]))["iou"]}

    @torch.no_grad()
    def train_eval(self, model, data: dict, steps: int) -> dict[str, float]:
        """IoU over the whole split at `steps` iterations (and per contour length: iou_pfN), the iterations used."""
        device = next(model.parameters()).device
        counts, iterations = [], []
        for i in range(0, len(data["images"]), EVAL_BATCH):
            out = model(data["images"][i : i + EVAL_BATCH].to(device), iters=steps)
            counts.append(pixel_counts(out["logits"].argmax(1) == 1, data["mask"][i : i + EVAL_BATCH]))
            iterations.append(out["iterations"].float().cpu())
        counts = np.concatenate(counts)
        result = {"iou": scores(counts)["iou"], "mean_iterations": float(torch.cat(iterations).mean())}
        lengths = data["length"].numpy() if "length" in data else np.zeros(0)
        for n in sorted(set(lengths.tolist())) if len(set(lengths.tolist())) > 1 else []:
            result[f"iou_pf{n}"] = scores(counts[lengths == n])["iou"]
        return result


PATHFINDER = register(PathfinderTask())
