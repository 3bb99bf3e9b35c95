"""PQ of a predictor on a COCO panoptic folder, with iterations-to-converge statistics."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import Progress

from ..errors import CrbpError
from .pq import evaluate_panoptic


def open_dataset(data: str | os.PathLike, split: str = "val"):
    """A folder with annotations.json + images/ + panoptic/, or a root holding such a SPLIT folder."""
    from ..data.coco_panoptic import PanopticDataset

    root = Path(data)
    if not root.exists():
        raise CrbpError(f"{root}: no such dataset folder")
    base = root if (root / "annotations.json").exists() else root / split
    return PanopticDataset(base / "images", base / "panoptic", base / "annotations.json", targets=False)


def iteration_stats(iterations: list[int], converged: list[bool]) -> dict[str, float]:
    it = np.asarray(iterations, dtype=np.float64)
    return {
        "mean": float(it.mean()),
        "median": float(np.median(it)),
        "p90": float(np.percentile(it, 90)),
        "min": int(it.min()),
        "max": int(it.max()),
        "converged_fraction": float(np.mean(converged)),
    }


def evaluate_predictor(predictor, dataset, *, batch_size: int = 16, progress: bool = False, limit: int = 0, **budget) -> dict[str, Any]:
    """Run `predictor` over `dataset` and score it with the panopticapi rules."""
    n = min(len(dataset), limit) if limit else len(dataset)
    if n == 0:
        raise CrbpError("the dataset holds no images")
    pairs, iterations, converged = [], [], []
    with Progress(disable=not progress, transient=True) as bar:
        job = bar.add_task("evaluating", total=n)
        for start in range(0, n, batch_size):
            items = [dataset.load(i) for i in range(start, min(start + batch_size, n))]
            preds = predictor.predict([rgb.astype(np.float32) / 255.0 for rgb, _, _ in items], **budget)
            for (_, ids, segments), pred in zip(items, preds):
                pairs.append((ids, segments, pred.pan_ids, pred.segments_info))
                iterations.append(pred.iterations)
                converged.append(pred.converged)
            bar.update(job, advance=len(items))
    result = evaluate_panoptic(pairs, dataset.categories)
    result["iterations"] = iteration_stats(iterations, converged)
    return result
