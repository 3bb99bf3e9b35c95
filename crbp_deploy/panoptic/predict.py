"""From images to COCO panoptic results: padding, the recurrent run, grouping, files for people.

`PanopticPredictor` takes any runner `run(images: Tensor, **budget) -> heads` (a PyTorch model or
a runtime Backend), so `predict`, `eval`, verification and the server share one path.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..budget import Budget
from ..models.solver import stop_reasons
from ..errors import InputError
from ..imageio import to_channels
from ..modelcard import ModelCard
from .encoding import id_to_rgb
from .postprocess import PostprocessConfig, _bbox, postprocess

#: Input-scale policies: "card" resizes to the model's trained scale (its card's image size, as the
#: shorter side) and maps the answer back; "native" runs the image as it arrives.
SCALES = ("card", "native")
#: Upsampling to the trained scale never makes the longer side exceed this many times that scale
#: (a 8 x 2048 strip is not blown up to 128 x 32768; it runs at native size instead).
MAX_UPSCALED_SIDE = 4


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


def trained_scale(card: Any) -> int | None:
    """The image size the model was trained and evaluated at (its card's evaluation.image_size), or None
    when the card does not record one (then every policy runs images at their native size)."""
    size = ModelCard.of(card).evaluation.get("image_size")
    return int(size) if isinstance(size, (int, float)) and size >= 1 else None


def check_scale(scale: str) -> str:
    if scale not in SCALES:
        raise InputError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
    return scale


def working_size(h: int, w: int, scale: str, trained: int | None) -> tuple[int, int]:
    """The size an H x W image runs at under `scale`: its shorter side at the trained scale ("card"),
    unless that would stretch the longer side past both its own length and MAX_UPSCALED_SIDE x the scale."""
    check_scale(scale)
    if scale == "native" or trained is None or min(h, w) == trained:
        return h, w
    f = trained / min(h, w)
    if f > 1 and max(h, w) * f > max(max(h, w), MAX_UPSCALED_SIDE * trained):
        return h, w
    return max(1, round(h * f)), max(1, round(w * f))


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """H x W x C float32 -> size, bilinear (antialiased when shrinking, so fine detail is averaged, not aliased)."""
    if tuple(image.shape[:2]) == tuple(size):
        return image
    t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    out = F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=True)
    return out[0].permute(1, 2, 0).clamp_(0, 1).contiguous().numpy()


def restore(pred: "Prediction", size: tuple[int, int]) -> "Prediction":
    """The prediction mapped back to the original pixels: the id map by nearest neighbour, each segment's
    area and bbox recomputed there (a segment that vanishes is dropped). A no-op at the same size."""
    h, w = size
    if tuple(pred.pan_ids.shape) == (h, w):
        return pred
    ph, pw = pred.pan_ids.shape
    rows = np.minimum((np.arange(h) + 0.5) * ph / h, ph - 1).astype(np.int64)
    cols = np.minimum((np.arange(w) + 0.5) * pw / w, pw - 1).astype(np.int64)
    pan = pred.pan_ids[rows[:, None], cols[None, :]]
    segments = []
    for seg in pred.segments_info:
        mask = pan == seg["id"]
        area = int(mask.sum())
        if area:
            segments.append({**seg, "area": area, "bbox": _bbox(mask)})
        else:
            pan[mask] = 0
    return replace(pred, pan_ids=pan, segments_info=segments)


def _void(h: int, w: int, n: int) -> list:
    """n all-void results (no segments), the answer for images whose state diverged."""
    return [(np.zeros((h, w), dtype=np.int64), []) for _ in range(n)]


class PanopticPredictor:
    """Images in, COCO panoptic Predictions out: the model's heads grouped into segments (`group`)."""

    in_channels: int = 3  # what the model takes (`predict` converts with imageio.to_channels)
    heads: tuple[str, ...] = ("semantic", "center", "offset", "embedding")  # what `group` reads

    def __init__(
        self,
        run: Callable[..., Mapping[str, Any]],
        categories: Sequence[Mapping[str, Any]],
        *,
        stride: int,
        budget: Mapping[str, Any] | None = None,
        postprocess_config: PostprocessConfig | None = None,
        trained: int | None = None,
        scale: str = "card",
    ):
        """`trained`: the model's trained image size (`trained_scale(card)`); `scale`: the default policy."""
        if not categories:
            raise InputError("a panoptic predictor needs the model's categories (missing from its card)")
        self.run = run
        self.categories = list(categories)
        self.stride = stride
        self.budget = dict(budget or Budget.DEFAULT.kwargs())
        self.post = postprocess_config or PostprocessConfig()
        self.trained = trained
        self.scale = check_scale(scale)

    @classmethod
    def from_model(cls, model, **kwargs) -> "PanopticPredictor":
        card = ModelCard.of(model)
        model.eval()

        def run(images, **budget):
            with torch.no_grad():
                return model(images, **budget)

        kwargs.setdefault("budget", card.budget.kwargs())
        kwargs.setdefault("postprocess_config", card.postprocess)
        kwargs.setdefault("trained", trained_scale(card))
        return cls(run, card.categories, stride=getattr(model, "stride", 1), **kwargs)

    @classmethod
    def from_backend(cls, backend, meta: Any, **kwargs) -> "PanopticPredictor":
        """A runtime Backend (ONNX Runtime, TensorRT, torch) with the model card's metadata."""

        def run(images, **budget):
            return backend.run(images.numpy(), **budget).outputs

        card = ModelCard.of(meta)
        kwargs.setdefault("budget", backend.budget_for(card.budget).kwargs())
        kwargs.setdefault("postprocess_config", card.postprocess)
        kwargs.setdefault("trained", trained_scale(card))
        stride = getattr(backend, "size_multiple", None) or 1
        return cls(run, card.categories, stride=stride, **kwargs)

    def working_size(self, h: int, w: int, scale: str | None = None) -> tuple[int, int]:
        """The size an H x W image runs at under `scale` (default: this predictor's policy)."""
        return working_size(h, w, scale or self.scale, self.trained)

    def predict(self, images: Sequence[np.ndarray], *, scale: str | None = None, **budget: Any) -> list[Prediction]:
        """Each image H x W x C float in [0, 1] (C converted to the model's, `to_channels`), run at
        `working_size` and answered at its own size; images of equal size are batched together."""
        budget = Budget.from_dict(self.budget).merge(budget).kwargs()
        results: list[Prediction | None] = [None] * len(images)
        groups: dict[tuple[int, int], list[int]] = {}
        images = [to_channels(img, self.in_channels, name=f"image {i}") for i, img in enumerate(images)]
        for i, img in enumerate(images):
            groups.setdefault(img.shape[:2], []).append(i)
        for (h, w), idx in groups.items():
            size = self.working_size(h, w, scale)
            stack = np.stack([resize_image(images[i], size) for i in idx])
            batch = torch.from_numpy(stack).permute(0, 3, 1, 2).float().contiguous()
            for i, pred in zip(idx, self._predict_batch(batch, budget)):
                results[i] = restore(pred, (h, w))
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
        heads = {k: out[k][..., :h, :w] for k in self.heads if k in out}
        n = len(out["residual"])
        finite = torch.isfinite(out["residual"])  # a non-finite residual: the state diverged
        grouped = _void(h, w, n)  # a diverged state has no segmentation to group
        if bool(finite.any()):
            kept = self.group({k: v[finite] for k, v in heads.items()})
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


    def group(self, heads: Mapping[str, torch.Tensor]) -> list[tuple[np.ndarray, list[dict[str, Any]]]]:
        """(id map, segments_info) per image from its cropped heads: panoptic grouping (postprocess.py)."""
        return postprocess(heads, self.categories, self.post)


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
