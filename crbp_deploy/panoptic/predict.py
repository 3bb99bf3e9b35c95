"""From images to COCO panoptic results: padding, the recurrent run, grouping, files for people.

`PanopticPredictor` takes any runner `run(images: Tensor, **budget) -> heads` (a PyTorch model or
a runtime Backend), so `predict`, `eval`, verification and the server share one path.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..budget import Budget
from ..models.solver import stop_reasons
from ..errors import InputError
from ..modelcard import ModelCard
from .encoding import id_to_rgb
from .postprocess import PostprocessConfig, postprocess


@dataclass
class Prediction:
    pan_ids: np.ndarray  # H x W, 0 = void, else a segments_info id
    segments_info: list[dict[str, Any]]
    iterations: int
    residual: float
    converged: bool
    diverged: bool = False  # the state turned non-finite: stopped, never counted as converged
    timings_ms: dict[str, float] = field(default_factory=dict)
    stopped: str = ""  # why: converged, policy, cap, diverged or fixed (models.solver.stop_reasons)

    def to_json(self, categories: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        return {
            "segments_info": self.segments_info,
            "iterations": self.iterations,
            "stopped": self.stopped,
            "residual": self.residual,
            "converged": self.converged,
            "diverged": self.diverged,
            "categories": [dict(c) for c in categories],
            "timings_ms": self.timings_ms,
        }


def _void(h: int, w: int, n: int) -> list:
    """n all-void results (no segments), the answer for images whose state diverged."""
    return [(np.zeros((h, w), dtype=np.int64), []) for _ in range(n)]


class PanopticPredictor:
    def __init__(
        self,
        run: Callable[..., Mapping[str, Any]],
        categories: Sequence[Mapping[str, Any]],
        *,
        stride: int,
        budget: Mapping[str, Any] | None = None,
        postprocess_config: PostprocessConfig | None = None,
    ):
        if not categories:
            raise InputError("a panoptic predictor needs the model's categories (missing from its card)")
        self.run = run
        self.categories = list(categories)
        self.stride = stride
        self.budget = dict(budget or Budget.DEFAULT.kwargs())
        self.post = postprocess_config or PostprocessConfig()

    @classmethod
    def from_model(cls, model, **kwargs) -> "PanopticPredictor":
        card = ModelCard.of(model)
        model.eval()

        def run(images, **budget):
            with torch.no_grad():
                return model(images, **budget)

        kwargs.setdefault("budget", card.budget.kwargs())
        kwargs.setdefault("postprocess_config", card.postprocess)
        return cls(run, card.categories, stride=getattr(model, "stride", 1), **kwargs)

    @classmethod
    def from_backend(cls, backend, meta: Any, **kwargs) -> "PanopticPredictor":
        """A runtime Backend (ONNX Runtime, TensorRT, torch) with the model card's metadata."""

        def run(images, **budget):
            return backend.run(images.numpy(), **budget).outputs

        card = ModelCard.of(meta)
        kwargs.setdefault("budget", backend.budget_for(card.budget).kwargs())
        kwargs.setdefault("postprocess_config", card.postprocess)
        stride = getattr(backend, "size_multiple", None) or 1
        return cls(run, card.categories, stride=stride, **kwargs)

    def predict(self, images: Sequence[np.ndarray], **budget: Any) -> list[Prediction]:
        """Each image H x W x 3 float in [0, 1]; images of equal size are batched together."""
        budget = Budget.from_dict(self.budget).merge(budget).kwargs()
        results: list[Prediction | None] = [None] * len(images)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, img in enumerate(images):
            if img.ndim != 3 or img.shape[2] != 3:
                raise InputError(f"image {i}: expected H x W x 3, got shape {img.shape}")
            groups.setdefault(img.shape[:2], []).append(i)
        for (h, w), idx in groups.items():
            batch = torch.from_numpy(np.stack([images[i] for i in idx])).permute(0, 3, 1, 2).float().contiguous()
            for i, pred in zip(idx, self._predict_batch(batch, budget)):
                results[i] = pred
        return results  # type: ignore[return-value]

    def _predict_batch(self, batch: torch.Tensor, budget: dict[str, Any]) -> list[Prediction]:
        h, w = batch.shape[-2:]
        ph, pw = (-h) % self.stride, (-w) % self.stride
        padded = F.pad(batch, (0, pw, 0, ph), mode="replicate") if ph or pw else batch
        t0 = time.perf_counter()
        out = self.run(padded, **budget)
        return self.decode(out, (int(h), int(w)), budget, (time.perf_counter() - t0) * 1e3)

    def decode(
        self, out: Mapping[str, Any], size: tuple[int, int], budget: Mapping[str, Any], model_ms: float
    ) -> list[Prediction]:
        """Heads of one model call (possibly padded) -> one Prediction per image, cropped to `size`.

        The postprocess half of a prediction, public so a scheduler that runs the steps itself can
        finish its answers the same way; `out["stopped"]` (a reason per image) overrides the reasons
        derived from the budget (a scheduler's deadline/budget stops are not visible in the heads).
        """
        h, w = size
        stopped = out.get("stopped")
        out = {k: torch.as_tensor(v) for k, v in out.items() if k != "stopped"}
        t1 = time.perf_counter()
        heads = {k: out[k][..., :h, :w] for k in ("semantic", "center", "offset", "embedding") if k in out}
        n = len(out["residual"])
        finite = torch.isfinite(out["residual"])  # a non-finite residual: the state diverged
        grouped = _void(h, w, n)  # a diverged state has no segmentation to group
        if bool(finite.any()):
            kept = postprocess({k: v[finite] for k, v in heads.items()}, self.categories, self.post)
            for i, result in zip(finite.nonzero().flatten().tolist(), kept):
                grouped[i] = result
        t2 = time.perf_counter()
        tol = budget.get("tol", 0.0)
        per_image = {"model": model_ms / n, "postprocess": (t2 - t1) * 1e3 / n}
        reasons = list(stopped) if stopped is not None else stop_reasons(
            out["iterations"].tolist(), out["residual"].tolist(), dict(budget)
        )
        preds = []
        for i, (pan_ids, segments) in enumerate(grouped):
            residual = float(out["residual"][i])
            converged = bool(residual <= tol) if "tol" in budget else False
            preds.append(
                Prediction(
                    pan_ids=pan_ids,
                    segments_info=segments,
                    iterations=int(out["iterations"][i]),
                    residual=residual if finite[i] else float("inf"),
                    converged=converged,
                    diverged=not bool(finite[i]),
                    timings_ms={k: round(v, 3) for k, v in per_image.items()},
                    stopped=reasons[i],
                )
            )
        return preds


def segment_colors(pan_ids: np.ndarray, segments: Sequence[Mapping[str, Any]], categories) -> np.ndarray:
    """RGB per pixel: stuff in its category colour, each thing instance in its own hue."""
    by_id = {c["id"]: c for c in categories}
    canvas = np.zeros(pan_ids.shape + (3,), dtype=np.uint8)
    rng = np.random.default_rng(0)
    for seg in segments:
        base = np.array(by_id.get(seg["category_id"], {}).get("color", [128, 128, 128]), dtype=np.int64)
        color = np.clip(base + (rng.integers(-90, 90, 3) if seg.get("isthing") else 0), 0, 255)
        canvas[pan_ids == seg["id"]] = color
    return canvas


def overlay(image: np.ndarray, pan_ids: np.ndarray, segments, categories, alpha: float = 0.55) -> np.ndarray:
    """The image with segments tinted and their boundaries drawn in white, as uint8 RGB."""
    base = (np.clip(image, 0, 1) * 255).astype(np.float32)
    colors = segment_colors(pan_ids, segments, categories).astype(np.float32)
    labelled = (pan_ids > 0)[..., None]
    out = np.where(labelled, (1 - alpha) * base + alpha * colors, base)
    edge = np.zeros(pan_ids.shape, dtype=bool)
    edge[:-1] |= pan_ids[:-1] != pan_ids[1:]
    edge[:, :-1] |= pan_ids[:, :-1] != pan_ids[:, 1:]
    out[edge] = 255
    return out.astype(np.uint8)


def write_prediction(out_dir: Path, stem: str, image: np.ndarray, pred: Prediction, categories) -> list[Path]:
    """`<stem>_panoptic.png` (COCO id PNG), `<stem>_panoptic.json`, `<stem>_overlay.png`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    png, js, ov = (out_dir / f"{stem}_panoptic.png", out_dir / f"{stem}_panoptic.json", out_dir / f"{stem}_overlay.png")
    Image.fromarray(id_to_rgb(pred.pan_ids)).save(png)
    js.write_text(json.dumps(pred.to_json(categories), indent=2))
    zoom = max(1, 256 // max(image.shape[:2]))
    big = Image.fromarray(overlay(image, pred.pan_ids, pred.segments_info, categories))
    big.resize((big.width * zoom, big.height * zoom), Image.NEAREST).save(ov)
    return [png, js, ov]
