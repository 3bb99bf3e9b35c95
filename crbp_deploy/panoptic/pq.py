"""Panoptic quality (PQ = SQ x RQ; Kirillov et al., CVPR 2019) under the COCO panopticapi rules.

Reported numbers come from `match_image`, a re-implementation of the rules of panopticapi's
`pq_compute` (the reference every COCO panoptic result is quoted with), per image:

- a GT and a predicted segment of the same category match when IoU > 0.5 (so matches are unique);
- the IoU union leaves out predicted pixels that are void (id 0) in the GT; predicted void pixels
  inside a GT segment stay in the union;
- crowd GT segments (`iscrowd` = 1) are never matched and never false negatives;
- an unmatched predicted segment is not a false positive when more than half of its area lies on GT
  void or on GT crowd regions of its own category;
- per-class PQ/SQ/RQ are summed over all images first; averages run over the classes with
  TP + FP + FN > 0 (all, things, stuff).

One deliberate deviation: panopticapi remembers only the last crowd segment of each category in an
image for the false-positive rule; here all crowd segments of the category count (the same when
there is at most one per category).

tests/pq_oracle.py cross-checks these numbers against torchmetrics' PanopticQuality.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ..errors import InputError
from .encoding import MAX_ID, rgb_to_id
from .postprocess import check_categories

_OFFSET = MAX_ID + 1  # gt * _OFFSET + pred is a unique key for a (gt, pred) pixel pair


@dataclass
class ClassStat:
    """Per-category sums over images."""

    iou: float = 0.0
    tp: int = 0
    fp: int = 0
    fn: int = 0

    def add(self, other: "ClassStat") -> None:
        self.iou += other.iou
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn


def _ids(x: Any, name: str) -> np.ndarray:
    """An id map as H x W int64: accepts integer ids (numpy or torch) or H x W x 3 uint8 RGB."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim == 3 and x.shape[-1] == 3 and x.dtype == np.uint8:
        return rgb_to_id(x)
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.integer):
        raise InputError(f"{name} must be an H x W integer id map or H x W x 3 uint8 RGB, got {x.dtype} {x.shape}")
    return x.astype(np.int64, copy=False)


def _segments(segments: Sequence[Mapping[str, Any]], name: str, known: set[int]) -> dict[int, Mapping[str, Any]]:
    out: dict[int, Mapping[str, Any]] = {}
    for s in segments:
        if not isinstance(s, Mapping) or "id" not in s or "category_id" not in s:
            raise InputError(f"{name}: each segment needs 'id' and 'category_id', got {s!r}")
        sid = int(s["id"])
        if not 0 < sid <= MAX_ID:
            raise InputError(f"{name}: segment id {sid} is outside 1..{MAX_ID} (0 is void)")
        if sid in out:
            raise InputError(f"{name}: segment id {sid} appears twice")
        if int(s["category_id"]) not in known:
            raise InputError(f"{name}: segment {sid} has unknown category_id {s['category_id']}")
        out[sid] = s
    return out


def _areas(ids: np.ndarray, segments: Mapping[int, Any], name: str) -> dict[int, int]:
    labels, counts = np.unique(ids, return_counts=True)
    stray = [int(v) for v in labels if v != 0 and int(v) not in segments]
    if stray:
        raise InputError(f"{name}: id map holds segment ids {stray[:10]} that are not in its segments_info")
    return {int(v): int(c) for v, c in zip(labels, counts)}


def match_image(
    gt_ids: Any,
    gt_segments: Sequence[Mapping[str, Any]],
    pred_ids: Any,
    pred_segments: Sequence[Mapping[str, Any]],
    known_categories: set[int],
) -> dict[int, ClassStat]:
    """One image's per-category IoU sum, TP, FP, FN under the panopticapi rules (module docstring)."""
    gt_map, pred_map = _ids(gt_ids, "gt_ids"), _ids(pred_ids, "pred_ids")
    if gt_map.shape != pred_map.shape:
        raise InputError(f"gt and prediction id maps differ in shape: {gt_map.shape} vs {pred_map.shape}")
    gt = _segments(gt_segments, "gt_segments", known_categories)
    pred = _segments(pred_segments, "pred_segments", known_categories)
    gt_area = _areas(gt_map, gt, "gt_ids")
    pred_area = _areas(pred_map, pred, "pred_ids")
    absent = sorted(set(pred) - set(pred_area))
    if absent:
        raise InputError(f"pred_segments lists ids {absent[:10]} that are not in the prediction id map")

    keys, counts = np.unique(gt_map * _OFFSET + pred_map, return_counts=True)
    inter = {(int(k) // _OFFSET, int(k) % _OFFSET): int(c) for k, c in zip(keys, counts)}

    stats: dict[int, ClassStat] = {}

    def stat(cat: Any) -> ClassStat:
        return stats.setdefault(int(cat), ClassStat())

    crowd = {g for g, s in gt.items() if s.get("iscrowd", 0)}
    matched_gt: set[int] = set()
    matched_pred: set[int] = set()
    for (g, p), n in inter.items():
        if g == 0 or p == 0 or g in crowd or int(gt[g]["category_id"]) != int(pred[p]["category_id"]):
            continue
        union = pred_area[p] + gt_area.get(g, 0) - n - inter.get((0, p), 0)
        iou = n / union
        if iou > 0.5:
            s = stat(gt[g]["category_id"])
            s.tp += 1
            s.iou += iou
            matched_gt.add(g)
            matched_pred.add(p)

    crowd_of: dict[int, list[int]] = {}
    for g, s in gt.items():
        if g in crowd:
            crowd_of.setdefault(int(s["category_id"]), []).append(g)
        elif g not in matched_gt:
            stat(s["category_id"]).fn += 1
    for p, s in pred.items():
        if p in matched_pred:
            continue
        ignored = inter.get((0, p), 0) + sum(inter.get((g, p), 0) for g in crowd_of.get(int(s["category_id"]), []))
        if ignored / pred_area[p] > 0.5:
            continue
        stat(s["category_id"]).fp += 1
    return stats


def _quality(s: ClassStat) -> dict[str, float]:
    n = s.tp + 0.5 * s.fp + 0.5 * s.fn
    return {
        "pq": 100.0 * s.iou / n if n else 0.0,
        "sq": 100.0 * s.iou / s.tp if s.tp else 0.0,
        "rq": 100.0 * s.tp / n if n else 0.0,
    }


def summarize(stats: Mapping[int, ClassStat], categories: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-class sums -> the result dict of `evaluate_panoptic` (percent; None for a group with no class)."""
    per_class: dict[int, dict[str, Any]] = {}
    groups: dict[str, list[dict[str, float]]] = {"all": [], "things": [], "stuff": []}
    for c in categories:
        s = stats.get(int(c["id"]), ClassStat())
        q = _quality(s)
        per_class[int(c["id"])] = {**q, "tp": s.tp, "fp": s.fp, "fn": s.fn}
        if s.tp + s.fp + s.fn:
            groups["all"].append(q)
            groups["things" if c["isthing"] else "stuff"].append(q)
    out: dict[str, Any] = {}
    for key in ("pq", "sq", "rq"):
        out[key] = {g: (sum(q[key] for q in qs) / len(qs) if qs else None) for g, qs in groups.items()}
    out["n"] = {g: len(qs) for g, qs in groups.items()}
    out["per_class"] = per_class
    out["counts"] = {k: sum(v[k] for v in per_class.values()) for k in ("tp", "fp", "fn")}
    return out


def evaluate_panoptic(
    pairs: Iterable[tuple[Any, Sequence[Mapping[str, Any]], Any, Sequence[Mapping[str, Any]]]],
    categories: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    """PQ / SQ / RQ (percent) for all, things and stuff, plus per class, under the panopticapi rules.

    pairs: (gt_ids, gt_segments, pred_ids, pred_segments) per image; id maps are H x W integer ids
    (0 = void) or COCO RGB arrays; segments are COCO segments_info dicts (`iscrowd` read from GT).
    Returns {"pq"|"sq"|"rq": {"all", "things", "stuff"}, "n": classes averaged per group,
    "per_class": {category_id: {pq, sq, rq, tp, fp, fn}}, "counts": {tp, fp, fn}, "images": int}.
    """
    cats = check_categories(categories)
    known = {int(c["id"]) for c in cats}
    totals: dict[int, ClassStat] = {}
    images = 0
    for i, item in enumerate(pairs):
        try:
            gt_ids, gt_segments, pred_ids, pred_segments = item
        except (TypeError, ValueError):
            raise InputError(f"pair {i} must be (gt_ids, gt_segments, pred_ids, pred_segments)") from None
        try:
            for cat, s in match_image(gt_ids, gt_segments, pred_ids, pred_segments, known).items():
                totals.setdefault(cat, ClassStat()).add(s)
        except InputError as exc:
            raise InputError(f"image {i}: {exc}") from None
        images += 1
    result = summarize(totals, cats)
    result["images"] = images
    return result


def format_table(result: Mapping[str, Any], categories: Sequence[Mapping[str, Any]] | None = None,
                 *, per_class: bool = False):
    """A rich Table: PQ/SQ/RQ for all/things/stuff, or (per_class) one row per class that appears."""
    from rich.table import Table


    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    table = Table(title=f"Panoptic quality ({result.get('images', '?')} images, panopticapi rules)")
    if per_class:
        names = {int(c["id"]): str(c.get("name", c["id"])) for c in categories or []}
        for col in ("category", "PQ", "SQ", "RQ", "TP", "FP", "FN"):
            table.add_column(col, justify="left" if col == "category" else "right")
        for cat, q in sorted(result["per_class"].items()):
            if q["tp"] + q["fp"] + q["fn"]:
                table.add_row(names.get(cat, str(cat)), fmt(q["pq"]), fmt(q["sq"]), fmt(q["rq"]),
                              str(q["tp"]), str(q["fp"]), str(q["fn"]))
        return table
    for col in ("", "PQ", "SQ", "RQ", "#classes"):
        table.add_column(col, justify="left" if not col else "right")
    for group in ("all", "things", "stuff"):
        table.add_row(group, fmt(result["pq"][group]), fmt(result["sq"][group]), fmt(result["rq"][group]),
                      str(result["n"][group]))
    tm = result.get("torchmetrics")  # added by a cross-check (tests/pq_oracle.py)
    if tm:
        verdict = "agrees" if tm["agrees"] else ("differs" if tm["comparable"] else "not comparable (crowd/stuff)")
        table.caption = f"torchmetrics cross-check: PQ {fmt(tm['pq']['all'])} ({verdict})"
    return table
