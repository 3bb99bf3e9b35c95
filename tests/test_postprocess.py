"""Box-free panoptic post-processing: grouping, COCO conversion, encoding, ONNX export parity."""
import math

import numpy as np
import pytest
import torch

from crbp_deploy.errors import ConfigError, InputError
from crbp_deploy.panoptic import (
    PostprocessConfig,
    decode_png,
    encode_png,
    evaluate_panoptic,
    id_to_rgb,
    panoptic_labels,
    postprocess,
    rgb_to_id,
    thing_mask_of,
    to_coco,
)

CATEGORIES = [
    {"id": 1, "name": "person", "isthing": 1},
    {"id": 3, "name": "car", "isthing": 1},
    {"id": 17, "name": "sky", "isthing": 0},
    {"id": 21, "name": "grass", "isthing": 0},
]
PERSON, CAR, SKY, GRASS = range(4)
H, W = 32, 40


def scene():
    """Two touching persons (only offsets separate them), sky above, grass below.

    Returns heads [1, ...] and the expected masks. Three pixels of person B are labelled car by the
    semantic head: the majority vote must keep them in the person segment.
    """
    cls = np.full((H, W), SKY)
    cls[16:] = GRASS
    person_a = np.zeros((H, W), bool)
    person_a[8:24, 6:14] = True
    person_b = np.zeros((H, W), bool)
    person_b[8:24, 14:22] = True
    cls[person_a | person_b] = PERSON
    cls[20, 15:18] = CAR
    centers = {"a": (15, 9), "b": (16, 18)}

    semantic = torch.full((1, 4, H, W), -4.0)
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    semantic[0, torch.from_numpy(cls), yy, xx] = 4.0
    center = torch.full((1, 1, H, W), -8.0)
    offset = torch.zeros(1, 2, H, W)
    ys, xs = np.indices((H, W))
    for name, mask in (("a", person_a), ("b", person_b)):
        cy, cx = centers[name]
        center[0, 0, cy, cx] = 3.0 if name == "a" else 2.0  # a ranks first
        m = torch.from_numpy(mask)
        offset[0, 0][m] = torch.from_numpy((cy - ys)[mask]).float()
        offset[0, 1][m] = torch.from_numpy((cx - xs)[mask]).float()
    sky = (cls == SKY)
    grass = (cls == GRASS)
    return {"semantic": semantic, "center": center, "offset": offset}, {
        "a": person_a, "b": person_b, "sky": sky, "grass": grass,
    }


def test_labels_for_two_touching_instances():
    heads, masks = scene()
    labels, scores = panoptic_labels(heads["semantic"], heads["center"], heads["offset"],
                                     thing_mask_of(CATEGORIES), top_k=4)
    labels = labels[0].numpy()
    assert labels.dtype == np.int64 and labels.shape == (H, W)
    assert torch.allclose(scores[0], torch.tensor([1 / (1 + math.exp(-3)), 1 / (1 + math.exp(-2)), 0, 0]))
    assert np.all(labels[masks["a"]] % 1000 == 1)
    b = labels[masks["b"]]
    assert np.all(b % 1000 == 2)
    assert set(np.unique(b // 1000)) == {PERSON, CAR}  # per-pixel class kept; vote comes later
    assert np.all(labels[masks["sky"]] == SKY * 1000)
    assert np.all(labels[masks["grass"]] == GRASS * 1000)


def test_postprocess_round_trips_segments():
    heads, masks = scene()
    [(pan, segments)] = postprocess(heads, CATEGORIES, top_k=4, min_area=1)
    assert pan.shape == (H, W)
    assert [s["id"] for s in segments] == [1, 2, 3, 4]
    by_mask = {name: segments[pan[m][0] - 1] for name, m in masks.items()}
    for name, m in masks.items():
        seg = by_mask[name]
        assert np.array_equal(pan == seg["id"], m), name
        assert seg["area"] == int(m.sum())
        ys, xs = np.nonzero(m)
        assert seg["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    assert by_mask["a"]["category_id"] == 1 and by_mask["a"]["isthing"] == 1
    assert by_mask["b"]["category_id"] == 1  # majority vote over 125 person + 3 car pixels
    assert by_mask["sky"]["category_id"] == 17 and by_mask["sky"]["isthing"] == 0
    assert by_mask["grass"]["category_id"] == 21
    probs = torch.softmax(heads["semantic"][0], 0).numpy()
    expected_a = 1 / (1 + math.exp(-3)) * probs[PERSON][masks["a"]].mean()
    assert by_mask["a"]["score"] == pytest.approx(expected_a, rel=1e-6)
    assert by_mask["sky"]["score"] == pytest.approx(probs[SKY][masks["sky"]].mean(), rel=1e-6)

    # The output is what PQ expects: perfect against the scene's own ground truth.
    gt_ids = np.zeros((H, W), np.int64)
    gt_segments = []
    for sid, (name, cat) in enumerate((("a", 1), ("b", 1), ("sky", 17), ("grass", 21)), start=7):
        gt_ids[masks[name]] = sid
        gt_segments.append({"id": sid, "category_id": cat, "iscrowd": 0})
    result = evaluate_panoptic([(gt_ids, gt_segments, pan, segments)], CATEGORIES)
    assert result["pq"]["all"] == pytest.approx(100.0)


def test_tiny_segments_become_void():
    heads, masks = scene()
    assert int(masks["a"].sum()) == 128 and int(masks["sky"].sum()) == 512
    [(pan, segments)] = postprocess(heads, CATEGORIES, top_k=4, min_area=129, min_stuff_area=0)
    assert np.all(pan[masks["a"] | masks["b"]] == 0)
    assert sorted(s["category_id"] for s in segments) == [17, 21]
    assert [s["id"] for s in segments] == [1, 2]  # ids stay contiguous
    [(pan, segments)] = postprocess(heads, CATEGORIES, top_k=4, min_area=128, min_stuff_area=513)
    assert np.all(pan[masks["sky"] | masks["grass"]] == 0)
    assert sorted(s["category_id"] for s in segments) == [1, 1]


def test_thing_pixels_without_centers_are_void():
    heads, masks = scene()
    heads["center"].fill_(-8.0)
    labels, scores = panoptic_labels(heads["semantic"], heads["center"], heads["offset"],
                                     thing_mask_of(CATEGORIES), top_k=4)
    assert torch.all(scores == 0)
    assert np.all(labels[0].numpy()[masks["a"]] % 1000 == 0)
    [(pan, segments)] = postprocess(heads, CATEGORIES, top_k=4, min_area=1)
    assert np.all(pan[masks["a"] | masks["b"]] == 0)
    assert sorted(s["category_id"] for s in segments) == [17, 21]


def random_heads(b, k, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    return {
        "semantic": torch.randn(b, k, h, w, generator=g),
        "center": torch.randn(b, 1, h, w, generator=g) * 3,
        "offset": torch.randn(b, 2, h, w, generator=g) * 4,
    }


def test_batch_equals_single_calls():
    heads = random_heads(3, 4, 20, 24, seed=1)
    batch = postprocess(heads, CATEGORIES, top_k=8, min_area=2)
    for i, (pan, segments) in enumerate(batch):
        [(pan_i, segments_i)] = postprocess({k: v[i:i + 1] for k, v in heads.items()}, CATEGORIES, top_k=8, min_area=2)
        assert np.array_equal(pan, pan_i)
        assert segments == segments_i
    assert any(s["isthing"] for _, segs in batch for s in segs)


def test_fewer_pixels_than_slots_and_saturated_peaks():
    """topk needs no H*W >= top_k; peaks are found on logits, so two saturated peaks stay distinct."""
    heads = random_heads(1, 4, 2, 3, seed=2)
    labels, scores = panoptic_labels(heads["semantic"], heads["center"], heads["offset"],
                                     thing_mask_of(CATEGORIES), top_k=16)
    assert labels.shape == (1, 2, 3) and scores.shape == (1, 16)
    center = torch.full((1, 1, 9, 9), -9.0)
    center[0, 0, 4, 4], center[0, 0, 4, 5] = 40.0, 30.0  # sigmoid: both exactly 1.0 in float32
    assert torch.sigmoid(center[0, 0, 4, 4]) == torch.sigmoid(center[0, 0, 4, 5])
    semantic = torch.zeros(1, 4, 9, 9)
    semantic[:, PERSON] = 1
    _, scores = panoptic_labels(semantic, center, torch.zeros(1, 2, 9, 9), thing_mask_of(CATEGORIES), top_k=4)
    assert int((scores > 0).sum()) == 1


def test_bad_input_and_options():
    heads = random_heads(1, 4, 8, 8, seed=3)
    with pytest.raises(ConfigError, match="unknown key"):
        postprocess(heads, CATEGORIES, center_treshold=0.2)
    with pytest.raises(ConfigError, match="nms_kernel"):
        PostprocessConfig(nms_kernel=4)
    with pytest.raises(InputError, match="heads lack offset"):
        postprocess({"semantic": heads["semantic"], "center": heads["center"]}, CATEGORIES)
    with pytest.raises(InputError, match="thing_mask"):
        panoptic_labels(heads["semantic"], heads["center"], heads["offset"], torch.ones(3, dtype=torch.bool))
    with pytest.raises(InputError, match="semantic_probs"):
        to_coco(np.zeros((8, 8), np.int64), np.zeros((3, 8, 8)), np.zeros(4), CATEGORIES)


def test_coco_id_encoding_round_trip():
    ids = np.array([[0, 1, 255, 256], [65535, 65536, 256**3 - 1, 7]], dtype=np.int64)
    rgb = id_to_rgb(ids)
    assert rgb.dtype == np.uint8 and rgb[0, 3].tolist() == [0, 1, 0]
    assert np.array_equal(rgb_to_id(rgb), ids)
    assert np.array_equal(decode_png(encode_png(ids)), ids)
    with pytest.raises(InputError, match="segment ids"):
        id_to_rgb(np.array([[256**3]]))
    with pytest.raises(InputError, match="PNG"):
        decode_png(b"not a png")


class _Grouping(torch.nn.Module):
    def __init__(self, thing_mask):
        super().__init__()
        self.register_buffer("thing_mask", thing_mask)

    def forward(self, semantic, center, offset):
        return panoptic_labels(semantic, center, offset, self.thing_mask, top_k=8)


def test_onnx_export_parity(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    module = _Grouping(thing_mask_of(CATEGORIES)).eval()
    example = random_heads(2, 4, 24, 32, seed=4)
    b, h, w = torch.export.Dim("batch", max=64), torch.export.Dim("height", max=4096), torch.export.Dim("width", max=4096)
    dims = {0: b, 2: h, 3: w}
    path = tmp_path / "grouping.onnx"
    torch.onnx.export(
        module, (example["semantic"], example["center"], example["offset"]), str(path), dynamo=True,
        input_names=["semantic", "center", "offset"], output_names=["labels", "center_scores"],
        dynamic_shapes={"semantic": dims, "center": dims, "offset": dims}, verbose=False,
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    heads, masks = scene()
    cases = [random_heads(2, 4, 24, 32, seed=5), random_heads(3, 4, 17, 41, seed=6), heads]
    for case in cases:
        labels, scores = module(case["semantic"], case["center"], case["offset"])
        got_labels, got_scores = session.run(None, {k: v.numpy() for k, v in case.items()})
        assert got_labels.dtype == np.int64
        assert np.array_equal(got_labels, labels.numpy())
        np.testing.assert_allclose(got_scores, scores.numpy(), atol=1e-6)
        assert len(np.unique(got_labels % 1000)) > 1  # instances were actually formed
