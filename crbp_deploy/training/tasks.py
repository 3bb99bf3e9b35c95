"""Tasks the trainer knows: how to load their data, score outputs and describe themselves."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import CrbpError
from .losses import IGNORE, PATHFINDER_LOSSES, iou_counts, panoptic_loss

EVAL_BATCH = 32


class PathfinderTask:
    """Per-pixel segmentation of the marked contour; metric: IoU of the contour pixels."""

    default_model = "hgru-pathfinder"

    def __init__(self, cfg):
        self.cfg = cfg
        self.loss_fn = PATHFINDER_LOSSES[cfg.loss]

    def load(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """DATA/train + DATA/val (each written by `crbp-deploy data pathfinder`), or one folder split 90/10."""
        root = Path(self.cfg.data)
        if (root / "train").is_dir():
            return load_pathfinder(root / "train"), load_pathfinder(root / "val")
        data = load_pathfinder(root)
        cut = len(data["images"]) - max(1, len(data["images"]) // 10)
        return {k: v[:cut] for k, v in data.items()}, {k: v[cut:] for k, v in data.items()}

    def model_config(self) -> dict[str, Any]:
        return dict(self.cfg.model_config)

    def loss(self, outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        loss = self.loss_fn(outputs["logits"], batch["mask"])
        inter, union = iou_counts(outputs["logits"].detach(), batch["mask"])
        return loss, {"iou": inter / max(union, 1)}

    @torch.no_grad()
    def evaluate(self, model, data: dict[str, Tensor], steps: int) -> dict[str, float]:
        return evaluate_pathfinder(model, data, iters=steps)

    def describe_data(self) -> dict[str, Any]:
        return {"task": "pathfinder", "folder": self.cfg.data}

    def extra_meta(self) -> dict[str, Any]:
        return {}


def load_pathfinder(folder: Path) -> dict[str, Tensor]:
    """A Pathfinder folder as in-memory tensors: images N x 1 x H x W, mask N x H x W."""
    from ..data.pathfinder import PathfinderFolder

    ds = PathfinderFolder(folder)
    if len(ds) == 0:
        raise CrbpError(f"{folder} holds no images")
    pairs = [ds[i] for i in range(len(ds))]
    return {"images": torch.stack([p[0] for p in pairs]), "mask": torch.stack([p[1] for p in pairs])}


@torch.no_grad()
def evaluate_pathfinder(model, data: dict[str, Tensor], **budget) -> dict[str, float]:
    """IoU over a whole split and the iterations used (fixed `iters=` or early exit `max_iters=, tol=`)."""
    inter = union = 0
    iterations = []
    device = next(model.parameters()).device
    for i in range(0, len(data["images"]), EVAL_BATCH):
        out = model(data["images"][i : i + EVAL_BATCH].to(device), **budget)
        a, b = iou_counts(out["logits"], data["mask"][i : i + EVAL_BATCH].to(device))
        inter, union = inter + a, union + b
        iterations.append(out["iterations"].float())
    return {"iou": inter / max(union, 1), "mean_iterations": float(torch.cat(iterations).mean())}


class PanopticTask:
    """Box-free panoptic training targets: semantic classes, centre heatmap, centre offsets."""

    default_model = "hgru-panoptic"

    def __init__(self, cfg):
        self.cfg = cfg
        self.categories: list[dict] = []

    def load(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        root = Path(self.cfg.data)
        train, self.categories = load_panoptic_split(root, "train")
        val, _ = load_panoptic_split(root, "val")
        return train, val

    def model_config(self) -> dict[str, Any]:
        things = [i for i, c in enumerate(self.categories) if c["isthing"]]
        return {"num_classes": len(self.categories), "thing_classes": things, **self.cfg.model_config}

    def loss(self, outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        return panoptic_loss(outputs, batch)

    @torch.no_grad()
    def evaluate(self, model, data: dict[str, Tensor], steps: int) -> dict[str, float]:
        """Cheap per-epoch check: validation loss and semantic mIoU (PQ comes from `crbp-deploy eval`)."""
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

    def describe_data(self) -> dict[str, Any]:
        return {"task": "panoptic", "folder": self.cfg.data}

    def extra_meta(self) -> dict[str, Any]:
        return {"categories": self.categories}


def load_panoptic_split(root: Path, split: str, sigma: float = 4.0) -> tuple[dict[str, Tensor], list[dict]]:
    """A whole split as in-memory training tensors, plus its categories in contiguous-index order."""
    from ..data.coco_panoptic import PanopticDataset, category_ids

    ds = PanopticDataset.from_split(root, split, sigma=sigma)
    if len(ds) == 0:
        raise CrbpError(f"{root / split} holds no images")
    items = [ds[i] for i in range(len(ds))]
    by_id = {c["id"]: c for c in ds.categories}
    categories = [by_id[cid] for cid in category_ids(ds.categories)]
    tensors = {
        "images": torch.stack([it["image"] for it in items]),
        "semantic": torch.stack([it["semantic"] for it in items]),
        "center": torch.stack([it["center"] for it in items]),
        "offset": torch.stack([it["offset"] for it in items]),
        "thing": torch.stack([it["offset_mask"][0] for it in items]).bool(),
        "instance": torch.stack([it["thing_instance"] for it in items]),
    }
    return tensors, categories


TASKS = {"pathfinder": PathfinderTask, "panoptic": PanopticTask}
