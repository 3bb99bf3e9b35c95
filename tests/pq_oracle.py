"""The torchmetrics cross-check of crbp_deploy's PQ: a test oracle, not part of the library.

Cross-check (`evaluate_panoptic(..., cross_check=True)` below): the same pairs also go through `torchmetrics.detection.
PanopticQuality` (1.9), a maintained implementation. Its rules differ from panopticapi's:
(a) it has no crowd: crowd is passed as void, which also removes crowd pixels from a prediction's
area in every IoU and lets any class's crowd excuse a false positive; (b) predicted void pixels are
removed from the GT segment's area in the IoU, and a GT segment more than half covered by predicted
void is not a false negative; (c) all segments of one stuff class are merged. (b) is neutralised here
by passing predicted void as an extra category that no GT has (left out of the averages), so the two
must agree exactly whenever no predicted pixel lies on a GT crowd region and each image has at most
one segment per stuff class in GT and prediction (the COCO format and `to_coco` output satisfy the
latter). `result["torchmetrics"]` holds its numbers, whether the case is `comparable` and whether
they `agree`.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from crbp_deploy.panoptic import pq as library
from crbp_deploy.panoptic.postprocess import check_categories
from crbp_deploy.panoptic.pq import ClassStat, _ids, _segments, summarize


def evaluate_panoptic(pairs, categories, *, cross_check: bool = False) -> dict[str, Any]:
    """The library's PQ, plus "torchmetrics" (same layout + comparable, agrees) when cross_check is set.
    The cross-check is slow (measured: ~7 s for one 640 x 640 image with 85 segments, vs 0.06 s)."""
    pairs = list(pairs) if cross_check else pairs
    result = library.evaluate_panoptic(pairs, categories)
    if cross_check:
        cats = check_categories(categories)
        known = {int(c["id"]) for c in cats}
        check = _TorchmetricsCheck(cats)
        for gt_ids, gt_segments, pred_ids, pred_segments in pairs:
            check.update(_ids(gt_ids, "gt_ids"), _segments(gt_segments, "gt", known),
                         _ids(pred_ids, "pred_ids"), _segments(pred_segments, "pred", known))
        result["torchmetrics"] = check.result(result) if result["images"] else None
    return result


class _TorchmetricsCheck:
    """Feeds the same pairs to torchmetrics' PanopticQuality (see the module docstring for the mapping)."""

    def __init__(self, categories: Sequence[Mapping[str, Any]]):
        from torchmetrics.detection import PanopticQuality

        self.categories = categories
        self.things = sorted(int(c["id"]) for c in categories if c["isthing"])
        self.stuffs = sorted(int(c["id"]) for c in categories if not c["isthing"])
        self.pred_void = max(int(c["id"]) for c in categories) + 1  # an extra stuff class no GT has
        self.metric = PanopticQuality(
            things=set(self.things), stuffs=set(self.stuffs) | {self.pred_void},
            return_sq_and_rq=True, return_per_class=True,
        )
        self.comparable = True

    @staticmethod
    def _pairs(ids: np.ndarray, table: dict[int, int]) -> Any:
        import torch

        uniq, inverse = np.unique(ids, return_inverse=True)
        cats = np.array([table[int(u)] for u in uniq], dtype=np.int64)[inverse.reshape(ids.shape)]
        return torch.from_numpy(np.stack([cats, ids], axis=-1))[None]

    def update(self, gt_map, gt, pred_map, pred) -> None:
        crowd = {g for g, s in gt.items() if s.get("iscrowd", 0)}
        if crowd and np.any(np.isin(gt_map, list(crowd)) & (pred_map != 0)):
            self.comparable = False
        stuff = set(self.stuffs)
        for segs in (gt, pred):
            cats = [int(s["category_id"]) for g, s in segs.items() if g not in crowd and int(s["category_id"]) in stuff]
            if len(cats) != len(set(cats)):
                self.comparable = False
        # GT void and crowd -> an unknown category (torchmetrics makes it void); predicted void -> pred_void.
        gt_table = {0: -1, **{g: (-1 if g in crowd else int(s["category_id"])) for g, s in gt.items()}}
        pred_table = {0: self.pred_void, **{p: int(s["category_id"]) for p, s in pred.items()}}
        self.metric.update(self._pairs(pred_map, pred_table), self._pairs(gt_map, gt_table))

    def result(self, reference: Mapping[str, Any]) -> dict[str, Any]:
        order = self.things + self.stuffs + [self.pred_void]  # torchmetrics' class order
        m = self.metric
        stats = {
            cat: ClassStat(float(m.iou_sum[i]), int(m.true_positives[i]), int(m.false_positives[i]),
                           int(m.false_negatives[i]))
            for i, cat in enumerate(order) if cat != self.pred_void
        }
        per_class = m.compute()  # [C, 3]: its own pq, sq, rq per class, same order
        out = summarize(stats, self.categories)
        for i, cat in enumerate(order[:-1]):
            out["per_class"][cat].update(zip(("pq", "sq", "rq"), (100.0 * float(v) for v in per_class[i])))
        out["comparable"] = self.comparable
        out["agrees"] = self.comparable and _same(out, reference)
        return out


def _same(a: Mapping[str, Any], b: Mapping[str, Any], tol: float = 1e-4) -> bool:
    """Equal counts per class and PQ/SQ/RQ within tol (torchmetrics divides in float32)."""
    for cat, qa in a["per_class"].items():
        qb = b["per_class"][cat]
        if any(qa[k] != qb[k] for k in ("tp", "fp", "fn")):
            return False
        if any(abs(qa[k] - qb[k]) > tol for k in ("pq", "sq", "rq")):
            return False
    return True
