"""Panoptic segmentation on COCO panoptic folders; quality = PQ (panopticapi rules, already in points).

Training targets are box-free: semantic classes, centre heatmap and offsets (or instance ids for the
embedding head); the per-epoch check is the validation loss and semantic mIoU (PQ comes from `eval`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from rich.progress import Progress
from torch import Tensor

from ..data.coco_panoptic import PanopticDataset, category_ids
from ..data.panoptic_synth import write_dataset
from ..errors import InputError
from ..modelcard import ModelCard
from ..panoptic.pq import evaluate_panoptic, format_table
from ..panoptic.predict import PanopticPredictor
from ..training.losses import IGNORE, panoptic_loss
from .base import EVAL_BATCH, TaskBase, TrainingData, data_folder, first, iteration_line, iteration_stats, register

TARGET_SIGMA = 4.0  # px: the training centre heatmap's Gaussian


class PanopticTask(TaskBase):
    name, metric, default_model = "panoptic", "PQ", "hgru-panoptic"
    eval_batch, parity_images = 16, 24
    marker, label, how = ("annotations.json", "COCO panoptic data (annotations.json)",
                          "a COCO panoptic folder (annotations.json, images/, panoptic/), e.g. from `crbp-deploy data panoptic`")

    def open(self, data: str | os.PathLike, split: str = "val", *, targets: bool = False):
        base = data_folder(self, data, split)
        dataset = PanopticDataset(base / "images", base / "panoptic", base / "annotations.json", targets=targets,
                                  sigma=TARGET_SIGMA)
        return self._checked(dataset, base)

    def generate(self, folder: Path, count: int, size: int, seed: int) -> Path:
        write_dataset(folder, count=count, size=size, seed=seed, val_fraction=1.0, progress=None)
        return folder / "val"

    def runner(self, model, backend=None, source: str | None = None):
        """A PanopticPredictor over the model, or over `backend` with the model's card and stride."""
        if not ModelCard.of(model).categories:
            raise InputError(f"{source or 'this model'} is not a trained panoptic model (its card lists no categories)")
        if backend is None:
            return PanopticPredictor.from_model(model)
        predictor = PanopticPredictor.from_backend(backend, getattr(model, "meta", None))
        predictor.stride = int(getattr(model, "stride", predictor.stride))
        return predictor

    def evaluate(self, runner, dataset, *, limit: int = 0, batch_size: int | None = None, progress: bool = False,
                 **budget) -> dict[str, Any]:
        """Run the predictor over the first `limit` images and score them with the panopticapi rules."""
        n, batch_size = first(dataset, limit), batch_size or self.eval_batch
        pairs, iterations, converged = [], [], []
        with Progress(disable=not progress, transient=True) as bar:
            job = bar.add_task("evaluating", total=n)
            for start in range(0, n, batch_size):
                items = [dataset.load(i) for i in range(start, min(start + batch_size, n))]
                preds = runner.predict([rgb.astype(np.float32) / 255.0 for rgb, _, _ in items], **budget)
                for (_, ids, segments), pred in zip(items, preds):
                    pairs.append((ids, segments, pred.pan_ids, pred.segments_info))
                    iterations.append(pred.iterations)
                    converged.append(pred.converged)
                bar.update(job, advance=len(items))
        result = evaluate_panoptic(pairs, dataset.categories)
        result["iterations"] = iteration_stats(iterations, converged)
        return result

    def quality(self, result: Mapping[str, Any]) -> float:
        return float(result["pq"]["all"])

    def details(self, result: Mapping[str, Any]) -> dict[str, Any]:
        return {"pq_things": result["pq"].get("things"), "pq_stuff": result["pq"].get("stuff")}

    def report(self, result: Mapping[str, Any], dataset, *, per_class: bool = False) -> list:
        """PQ / SQ / RQ for all, things and stuff (and per class), then the iterations line."""
        tables = [format_table(result, dataset.categories)]
        if per_class:
            tables.append(format_table(result, dataset.categories, per_class=True))
        return tables + [iteration_line(result["iterations"]) + f" (budget {result['budget']}, {result['images']} images)"]

    def images(self, dataset, count: int) -> np.ndarray:
        rgb = [dataset.load(i)[0] for i in range(min(count, len(dataset)))]
        return np.stack(rgb).transpose(0, 3, 1, 2).astype(np.float32) / 255.0

    def trace_io(self, model, dataset, limit: int, batch: int):
        """Batches of (images, [(ids, segments)]) and a decoder: one step's heads -> [B, K, 4] (iou, tp, fp, fn)
        per category, the panopticapi matching of each image."""
        from ..panoptic.postprocess import postprocess
        from ..panoptic.pq import match_image

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

        return batches(), decode

    def counts_quality(self, counts: np.ndarray) -> float:
        """PQ (points) of [N, K, 4] counts: per category summed over images, averaged over the categories seen."""
        pq, seen = _pq(counts.sum(axis=0))
        return 100.0 * float(pq[seen].mean()) if seen.any() else 0.0

    def image_quality(self, counts: np.ndarray) -> np.ndarray:
        """[...] image PQ in [0, 1] from [..., K, 4] counts (1 for an image with nothing to find or found)."""
        pq, seen = _pq(counts)
        return np.where(seen.any(-1), (pq * seen).sum(-1) / np.maximum(seen.sum(-1), 1), 1.0)

    def training_data(self, cfg) -> TrainingData:
        """DATA/train and DATA/val; the model gets one class per category (contiguous-index order)."""
        root = Path(cfg.data)
        train, val = (self.open(root / split, targets=True) for split in ("train", "val"))
        by_id = {c["id"]: c for c in train.categories}
        categories = [by_id[cid] for cid in category_ids(train.categories)]
        things = [i for i, c in enumerate(categories) if c["isthing"]]
        config = {"num_classes": len(categories), "thing_classes": things, **cfg.model_config}
        return TrainingData(as_tensors(train), as_tensors(val), config, {"categories": categories})

    def loss(self, outputs, batch, cfg):
        return panoptic_loss(outputs, batch)

    @torch.no_grad()
    def train_eval(self, model, data: dict, steps: int) -> dict[str, float]:
        """Validation loss and semantic mIoU at `steps` iterations."""
        k = model.config.num_classes
        device = next(model.parameters()).device
        confusion = torch.zeros(k, k, dtype=torch.int64, device=device)
        losses = []
        for i in range(0, len(data["images"]), EVAL_BATCH):
            batch = {key: v[i : i + EVAL_BATCH].to(device) for key, v in data.items()}
            out = model(batch["images"], iters=steps)
            losses.append(float(panoptic_loss(out, batch)[0]))
            pred, true = out["semantic"].argmax(1), batch["semantic"]
            keep = true != IGNORE
            confusion += torch.bincount(true[keep] * k + pred[keep], minlength=k * k).view(k, k)
        inter = confusion.diag().float()
        union = confusion.sum(0).float() + confusion.sum(1).float() - inter
        present = union > 0
        return {"loss": sum(losses) / len(losses), "miou": float((inter[present] / union[present]).mean())}


def _pq(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PQ per category (fraction) and whether the category occurs, from [..., K, 4] (iou, tp, fp, fn) sums."""
    n = counts[..., 1] + 0.5 * (counts[..., 2] + counts[..., 3])
    return np.where(n > 0, counts[..., 0] / np.maximum(n, 1e-12), 0.0), n > 0


def as_tensors(dataset) -> dict[str, Tensor]:
    """A split opened with targets as in-memory training tensors."""
    items = [dataset[i] for i in range(len(dataset))]
    keys = {"images": "image", "semantic": "semantic", "center": "center", "offset": "offset",
            "instance": "thing_instance"}
    tensors = {key: torch.stack([it[name] for it in items]) for key, name in keys.items()}
    tensors["thing"] = torch.stack([it["offset_mask"][0] for it in items]).bool()
    return tensors


PANOPTIC = register(PanopticTask())
