"""PQ under the panopticapi rules: hand-computed cases, and a cross-check against torchmetrics."""
import io

import numpy as np
import pytest
import torch
from rich.console import Console

from crbp_deploy.errors import InputError
from crbp_deploy.panoptic import format_table
from pq_oracle import evaluate_panoptic

CATEGORIES = [
    {"id": 1, "name": "person", "isthing": 1},
    {"id": 2, "name": "car", "isthing": 1},
    {"id": 10, "name": "sky", "isthing": 0},
    {"id": 11, "name": "grass", "isthing": 0},
]


def image(*regions, size=(20, 20), ids=None):
    """An id map and segments_info from (category_id, mask-slice, iscrowd) regions, painted in order."""
    pan = np.zeros(size, np.int64)
    segments = []
    for i, (cat, where, *crowd) in enumerate(regions):
        sid = (ids or {}).get(i, i + 1)
        pan[where] = sid
        segments.append({"id": sid, "category_id": cat, "iscrowd": int(bool(crowd and crowd[0]))})
    return pan, segments


def pq(*pairs, **kw):
    return evaluate_panoptic([(g, gs, p, ps) for (g, gs), (p, ps) in pairs], CATEGORIES, **kw)


S = np.s_
SKY_PERSON_GT = image((10, S[:10]), (11, S[10:]), (1, S[2:6, 2:6]), (1, S[12:16, 12:16]))


def test_perfect_prediction_is_100_with_any_segment_ids():
    g = SKY_PERSON_GT
    p = image((10, S[:10]), (11, S[10:]), (1, S[2:6, 2:6]), (1, S[12:16, 12:16]), ids={0: 40, 1: 9, 2: 3, 3: 77})
    r = pq((g, p), cross_check=True)
    for key in ("pq", "sq", "rq"):
        assert r[key] == pytest.approx({"all": 100.0, "things": 100.0, "stuff": 100.0})
    assert r["n"] == {"all": 3, "things": 1, "stuff": 2}  # car never appears: not averaged
    assert r["per_class"][1] == {"pq": 100.0, "sq": 100.0, "rq": 100.0, "tp": 2, "fp": 0, "fn": 0}
    assert r["per_class"][2]["tp"] + r["per_class"][2]["fp"] + r["per_class"][2]["fn"] == 0
    assert r["counts"] == {"tp": 4, "fp": 0, "fn": 0} and r["images"] == 1
    assert r["torchmetrics"]["agrees"]


def test_one_missed_instance():
    # The second person is predicted void: person TP 1, FN 1 -> PQ = 1 / (1 + 0.5).
    p = image((10, S[:10]), (11, S[10:]), (1, S[2:6, 2:6]))
    p[0][12:16, 12:16] = 0
    r = pq((SKY_PERSON_GT, p), cross_check=True)
    assert r["per_class"][1] == pytest.approx({"pq": 200 / 3, "sq": 100.0, "rq": 200 / 3, "tp": 1, "fp": 0, "fn": 1})
    assert r["pq"]["things"] == pytest.approx(200 / 3)
    assert r["pq"]["stuff"] == pytest.approx(100.0)
    assert r["pq"]["all"] == pytest.approx((200 / 3 + 100 + 100) / 3)
    assert r["torchmetrics"]["agrees"]


def test_one_false_positive():
    g = image((10, S[:10]), (11, S[10:]), (1, S[2:6, 2:6]))
    p = image((10, S[:10]), (11, S[10:]), (1, S[2:6, 2:6]), (2, S[6:9, 10:13]))  # a 9 px car in the sky
    r = pq((g, p), cross_check=True)
    assert r["per_class"][2] == pytest.approx({"pq": 0.0, "sq": 0.0, "rq": 0.0, "tp": 0, "fp": 1, "fn": 0})
    sky = 100 * 175 / 184  # the car takes 9 of the sky's 184 px: still a match
    assert r["per_class"][10] == pytest.approx({"pq": sky, "sq": sky, "rq": 100.0, "tp": 1, "fp": 0, "fn": 0})
    assert r["pq"]["things"] == pytest.approx((100 + 0) / 2)
    assert r["pq"]["all"] == pytest.approx((100 + 0 + sky + 100) / 4)
    assert r["torchmetrics"]["agrees"]


@pytest.mark.parametrize("inside, outside, matched", [(51, 0, True), (50, 0, False), (61, 20, True), (60, 20, False)])
def test_iou_threshold_is_strictly_above_half(inside, outside, matched):
    gt = image((10, S[:10]), (11, S[10:20, 10:20]), (1, S[10:20, 0:10]))  # person: 100 px, grass beside it
    pred_map = np.zeros((20, 20), np.int64)
    pred_map[:10] = 1
    for i in range(inside):
        pred_map[10 + i // 10, i % 10] = 2  # on the GT person
    for i in range(outside):
        pred_map[10 + i // 10, 10 + i % 10] = 2  # on the GT grass
    pred = (pred_map, [{"id": 1, "category_id": 10}, {"id": 2, "category_id": 1}])
    r = pq((gt, pred), cross_check=True)
    iou = inside / (100 + outside)
    expected = {"tp": 1, "fp": 0, "fn": 0, "sq": 100 * iou} if matched else {"tp": 0, "fp": 1, "fn": 1, "sq": 0.0}
    assert {k: r["per_class"][1][k] for k in expected} == pytest.approx(expected)
    assert r["per_class"][1]["pq"] == pytest.approx(100 * iou if matched else 0.0)
    assert r["torchmetrics"]["agrees"]


def test_void_in_ground_truth():
    g = image((10, S[:10]), (1, S[12:16, 2:6]))  # rows 10.. outside the person are void
    # Person predicted 16 px on the GT person + 16 px on GT void: void leaves the union -> IoU 1, not 0.5.
    p = image((10, S[:10]), (1, S[12:16, 2:10]), (2, S[17:20, 10:13]), (2, S[17:20, 13:20]))
    # Both cars lie on GT void only: not false positives.
    r = pq((g, p), cross_check=True)
    assert r["per_class"][1] == pytest.approx({"pq": 100.0, "sq": 100.0, "rq": 100.0, "tp": 1, "fp": 0, "fn": 0})
    assert r["per_class"][2]["fp"] == 0
    assert r["torchmetrics"]["agrees"]

    # A car half on void and half on sky (5/10 void, not > 0.5) is a FP; 6/10 void is not.
    for on_void, fp in ((5, 1), (6, 0)):
        pred_map, segs = image((10, S[:10]))
        car = np.zeros((20, 20), bool)
        car[9, 20 - (10 - on_void):] = True  # on sky
        car[19, :on_void] = True  # on void
        pred_map[car] = 5
        r = pq((g, (pred_map, segs + [{"id": 5, "category_id": 2}])), cross_check=True)
        assert r["per_class"][2]["fp"] == fp
        assert r["torchmetrics"]["agrees"]


def test_predicted_void_stays_in_the_union_unlike_native_torchmetrics():
    g = image((10, S[:10]), (1, S[10:14, 0:5]))  # person: 20 px
    p = image((10, S[:10]), (1, S[10:13, 0:4]))  # 12 px on it, the other 8 predicted void
    r = pq((g, p), cross_check=True)
    assert r["per_class"][1]["sq"] == pytest.approx(60.0)  # 12 / 20
    assert r["torchmetrics"]["agrees"]  # because predicted void is passed as an extra class
    # torchmetrics fed directly (predicted void as void) removes it from the GT area: IoU 12 / 12.
    from torchmetrics.detection import PanopticQuality

    def pairs(pan, segs):
        cat = {0: 99, **{s["id"]: s["category_id"] for s in segs}}
        return torch.tensor(np.stack([np.vectorize(cat.get)(pan), pan], -1))[None]

    native = PanopticQuality(things={1, 2}, stuffs={10, 11}, return_sq_and_rq=True, return_per_class=True,
                             allow_unknown_preds_category=True)
    per_class = native(pairs(*p), pairs(*g))
    assert float(per_class[0, 1]) == pytest.approx(1.0)


def test_crowd_regions():
    crowd = S[10:20, 10:20]
    g = image((10, S[:10]), (11, S[10:20, :10]), (1, crowd, True))
    # Nothing predicted on the crowd: no FN for it, and torchmetrics (crowd as void) agrees.
    p = image((10, S[:10]), (11, S[10:20, :10]))
    r = pq((g, p), cross_check=True)
    assert r["per_class"][1]["fn"] == 0 and r["n"]["things"] == 0 and r["pq"]["things"] is None
    assert r["torchmetrics"]["comparable"] and r["torchmetrics"]["agrees"]

    # A person mostly on the person crowd is not a FP; the same segment labelled car is.
    for cat, fp in ((1, 0), (2, 1)):
        p = image((10, S[:10]), (11, S[10:20, :10]), (cat, S[10:20, 8:14]))  # 40 px crowd, 20 px grass
        r = pq((g, p), cross_check=True)
        assert r["per_class"][cat]["fp"] == fp
        assert not r["torchmetrics"]["comparable"]
    # torchmetrics sees the crowd as void for every class: it does not count the car FP.
    assert r["torchmetrics"]["per_class"][2]["fp"] == 0

    # Crowd pixels stay in a matched prediction's union (panopticapi): IoU 16/24, not 16/16.
    g = image((10, S[:10]), (1, S[10:14, 0:4]), (1, S[10:14, 4:8], True))
    p = image((10, S[:10]), (1, S[10:14, 0:6]))
    r = pq((g, p), cross_check=True)
    assert r["per_class"][1]["sq"] == pytest.approx(100 * 16 / 24)
    assert r["torchmetrics"]["per_class"][1]["sq"] == pytest.approx(100.0)
    assert not r["torchmetrics"]["agrees"]


def test_things_stuff_split_and_accumulation_over_images():
    g1 = image((10, S[:10]), (11, S[10:]), (1, S[2:6, 2:6]))
    g2 = image((10, S[:10]), (11, S[10:]), (1, S[12:16, 12:16]))
    p1 = image((10, S[:10]), (11, S[10:]), (1, S[2:6, 2:6]))
    p2 = image((10, S[:10]), (11, S[10:]))  # second image misses its person: grass takes its 16 px
    r = pq((g1, p1), (g2, p2), cross_check=True)
    # Person: TP 1 (image 1) + FN 1 (image 2), summed over images first -> 66.7, not mean(100, 0) = 50.
    assert r["per_class"][1]["pq"] == pytest.approx(200 / 3)
    # Grass: IoU 1 in image 1 and 184/200 in image 2 -> SQ 96, RQ 100.
    assert r["per_class"][11] == pytest.approx({"pq": 96.0, "sq": 96.0, "rq": 100.0, "tp": 2, "fp": 0, "fn": 0})
    assert r["pq"]["things"] == pytest.approx(200 / 3)
    assert r["pq"]["stuff"] == pytest.approx((100 + 96) / 2)
    assert r["pq"]["all"] == pytest.approx((200 / 3 + 100 + 96) / 3)
    assert r["rq"]["stuff"] == pytest.approx(100.0)
    assert r["counts"] == {"tp": 5, "fp": 0, "fn": 1}
    assert r["torchmetrics"]["agrees"]
    assert r["torchmetrics"]["pq"] == pytest.approx(r["pq"])


def test_rgb_id_maps_are_accepted():
    from crbp_deploy.panoptic import id_to_rgb

    (g, gs), (p, ps) = SKY_PERSON_GT, SKY_PERSON_GT
    r = evaluate_panoptic([(id_to_rgb(g), gs, id_to_rgb(p * 1000), [{**s, "id": s["id"] * 1000} for s in ps])],
                          CATEGORIES)
    assert r["pq"]["all"] == pytest.approx(100.0)


def test_bad_input_is_named():
    g, gs = SKY_PERSON_GT
    with pytest.raises(InputError, match=r"image 0: pred_ids: id map holds segment ids \[4\]"):
        evaluate_panoptic([(g, gs, g, gs[:3])], CATEGORIES)
    with pytest.raises(InputError, match="lists ids"):
        evaluate_panoptic([(g, gs, g, gs + [{"id": 9, "category_id": 1}])], CATEGORIES)
    with pytest.raises(InputError, match="unknown category_id 5"):
        evaluate_panoptic([(g, gs, g, gs[:3] + [{"id": 4, "category_id": 5}])], CATEGORIES)
    with pytest.raises(InputError, match="differ in shape"):
        evaluate_panoptic([(g, gs, g[:5], gs)], CATEGORIES)
    with pytest.raises(InputError, match="must be"):
        evaluate_panoptic([(g, gs)], CATEGORIES)


def test_format_table():
    r = pq((SKY_PERSON_GT, SKY_PERSON_GT), cross_check=True)
    console = Console(file=io.StringIO(), width=100)
    console.print(format_table(r))
    console.print(format_table(r, CATEGORIES, per_class=True))
    text = console.file.getvalue()
    assert "things" in text and "100.00" in text and "agrees" in text
    assert "person" in text and "car" not in text  # classes that never appear are left out


def random_scene(rng, size, void, crowd):
    """Random stuff bands and thing rectangles; optionally a void patch and a crowd rectangle."""
    h, w = size
    things = []
    for _ in range(rng.integers(1, 6)):
        y, x = rng.integers(0, h - 3), rng.integers(0, w - 3)
        things.append((int(rng.choice([1, 2])), int(y), int(x), int(rng.integers(3, 10)), int(rng.integers(3, 10))))
    split = int(rng.integers(4, h - 4))
    stuff = [(int(rng.choice([10, 11])), 0), (int(rng.choice([10, 11])), split)]
    return {"things": things, "stuff": stuff, "void": void, "crowd": crowd, "size": size}


def render(scene, rng, jitter=0, drop=0.0, extra=0):
    """Id map + segments_info of a scene; with jitter/drop/extra it becomes a plausible prediction."""
    h, w = scene["size"]
    cats = np.zeros((h, w), np.int64)
    inst = np.zeros((h, w), np.int64)
    for cat, y in scene["stuff"]:
        cats[y:] = cat
    things = [t for t in scene["things"] if rng.random() >= drop]
    for _ in range(extra):
        things.append((int(rng.choice([1, 2])), int(rng.integers(0, h)), int(rng.integers(0, w)), 4, 4))
    for n, (cat, y, x, dy, dx) in enumerate(things, start=1):
        oy, ox = (rng.integers(-jitter, jitter + 1, size=2) if jitter else (0, 0))
        ys, xs = slice(max(y + oy, 0), max(y + oy + dy, 0)), slice(max(x + ox, 0), max(x + ox + dx, 0))
        cats[ys, xs] = cat
        inst[ys, xs] = n
    crowd_mask = np.zeros((h, w), bool)
    if scene["crowd"] and not (jitter or drop or extra):  # ground truth only
        y, x = scene["crowd"]
        crowd_mask[y:y + 5, x:x + 5] = True
        cats[crowd_mask] = 1
        inst[crowd_mask] = 0
    keys = cats * 1000 + inst + crowd_mask * 999
    ids = np.zeros((h, w), np.int64)
    segments = []
    for k in np.unique(keys):
        sid = int(rng.integers(1, 2**24 - 1))
        while any(s["id"] == sid for s in segments):
            sid += 1
        ids[keys == k] = sid
        segments.append({"id": sid, "category_id": int(k // 1000), "iscrowd": int(k % 1000 == 999)})
    if scene["void"]:
        y, x = scene["void"]
        ids[y:y + 6, x:x + 6] = 0
        segments = [s for s in segments if np.any(ids == s["id"])]
    return ids, segments


@pytest.mark.parametrize("seed", range(6))
def test_random_cross_check_against_torchmetrics(seed):
    """Same per-class TP/FP/FN/IoU as torchmetrics wherever its rules coincide with panopticapi's."""
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(8):
        size = (int(rng.integers(16, 40)), int(rng.integers(16, 40)))
        void = (int(rng.integers(0, size[0])), int(rng.integers(0, size[1]))) if i % 2 else None
        scene = random_scene(rng, size, void, crowd=None)
        gt = render(scene, rng)
        pred = render({**scene, "void": None}, rng, jitter=int(rng.integers(0, 4)), drop=0.2,
                      extra=int(rng.integers(0, 3)))
        if rng.random() < 0.5:  # predicted void patch
            y, x = rng.integers(0, size[0]), rng.integers(0, size[1])
            pred[0][y:y + 5, x:x + 5] = 0
            pred = (pred[0], [s for s in pred[1] if np.any(pred[0] == s["id"])])
        pairs.append((*gt, *pred))
    r = evaluate_panoptic(pairs, CATEGORIES, cross_check=True)
    tm = r["torchmetrics"]
    assert tm["comparable"] and tm["agrees"], (r["per_class"], tm["per_class"])
    assert tm["pq"] == pytest.approx(r["pq"], abs=1e-4)
    assert r["counts"]["tp"] > 0 and r["counts"]["fp"] + r["counts"]["fn"] > 0  # not a trivial case


@pytest.mark.parametrize("seed", range(3))
def test_random_crowd_untouched_by_predictions_agrees(seed):
    rng = np.random.default_rng(100 + seed)
    pairs = []
    for _ in range(6):
        size = (30, 30)
        scene = random_scene(rng, size, void=None, crowd=(int(rng.integers(0, 25)), int(rng.integers(0, 25))))
        gt_ids, gt_segs = render(scene, rng)
        pred_ids, pred_segs = render({**scene, "crowd": None}, rng, jitter=2, drop=0.2, extra=1)
        crowd_ids = [s["id"] for s in gt_segs if s["iscrowd"]]
        pred_ids[np.isin(gt_ids, crowd_ids)] = 0  # predictions avoid the crowd
        pred_segs = [s for s in pred_segs if np.any(pred_ids == s["id"])]
        pairs.append((gt_ids, gt_segs, pred_ids, pred_segs))
    r = evaluate_panoptic(pairs, CATEGORIES, cross_check=True)
    assert any(s["iscrowd"] for p in pairs for s in p[1])
    assert r["torchmetrics"]["comparable"] and r["torchmetrics"]["agrees"]
