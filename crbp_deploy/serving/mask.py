"""Pathfinder-task models (hgru-pathfinder, ff-pathfinder, hgru-public) answered in the COCO panoptic schema, so
every client, engine and the conformance test serve them unchanged.

Such a model gives per-pixel `logits`; what it decides (and what `eval` scores as IoU) is the argmax class,
class 1 being "on the marked contour". The answer holds one category, `CONTOUR`, and at most one segment,
id 1: the pixels whose argmax is class 1, with its area, bbox and score (the mean class-1 probability over
it); `panoptic_png` is that id map (0 elsewhere; no segment when no pixel is on the contour). Iterations,
residual, stop reason, budget and timings are those of any served model (PanopticPredictor.decode).
A colour image reaches a 1-channel model as its luma (imageio.to_channels).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np
import torch

from ..panoptic.postprocess import _bbox
from ..panoptic.predict import PanopticPredictor

#: The one category of a served Pathfinder model.
CONTOUR = {"id": 1, "name": "contour", "isthing": 1, "color": [255, 255, 255]}
SEGMENT_ID = 1  # the contour segment's id in the id map
ON_CONTOUR = 1  # the class of `logits` that means "on the marked contour"


class MaskPredictor(PanopticPredictor):
    """A Pathfinder model's argmax mask as one `contour` segment; the rest (sizes, padding, batching, stop
    reasons, timings) is PanopticPredictor's, so the service treats both alike."""

    heads = ("logits",)

    def __init__(self, run: Callable[..., Mapping[str, Any]], *, in_channels: int = 1, stride: int = 1,
                 budget: Mapping[str, Any] | None = None, trained: int | None = None, scale: str = "card"):
        super().__init__(run, [CONTOUR], stride=stride, budget=budget, trained=trained, scale=scale)
        self.in_channels = in_channels

    def group(self, heads: Mapping[str, torch.Tensor]) -> list[tuple[np.ndarray, list[dict[str, Any]]]]:
        logits = heads["logits"].float()
        on = (logits.argmax(dim=1) == ON_CONTOUR).numpy()
        probability = torch.softmax(logits, dim=1)[:, ON_CONTOUR].numpy()
        results = []
        for mask, p in zip(on, probability):
            pan_ids = np.where(mask, SEGMENT_ID, 0).astype(np.int64)
            area = int(mask.sum())
            segments = [{"id": SEGMENT_ID, "category_id": CONTOUR["id"], "isthing": CONTOUR["isthing"], "area": area,
                         "bbox": _bbox(mask), "score": float(p[mask].mean())}] if area else []
            results.append((pan_ids, segments))
        return results
