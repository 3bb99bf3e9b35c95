"""`crbp-deploy predict` and `crbp-deploy eval` on a small panoptic model and a generated split."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from crbp_deploy import checkpoint
from crbp_deploy.data.panoptic_synth import CATEGORIES, write_dataset
from crbp_deploy.models import create_model
from crbp_deploy.panoptic.encoding import rgb_to_id
from crbp_deploy.panoptic.predict import PanopticPredictor

TINY = {"encoder_channels": 8, "channels": 6, "kernel_size": 3, "head_channels": 8, "downsample": 1}
CATS = sorted(CATEGORIES, key=lambda c: c["id"])


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("hgru-panoptic", num_classes=4, thing_classes=[0, 1], **TINY)
    meta = {"categories": CATS, "inference": {"budget": {"max_iters": 30, "tol": 1e-2}, "postprocess": {"min_area": 4}}}
    return checkpoint.save(model, tmp_path_factory.mktemp("m") / "pan.pt", meta=meta)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_dataset(root, count=10, size=32, seed=1, val_fraction=0.5, progress=False)
    return root


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "crbp_deploy.cli", *args], capture_output=True, text=True, timeout=300)


def test_predict_writes_coco_files(model_file, dataset, tmp_path):
    image = sorted((dataset / "val" / "images").glob("*.png"))[0]
    r = _cli("predict", str(image), "--model", str(model_file), "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    stem = image.stem
    doc = json.loads((tmp_path / f"{stem}_panoptic.json").read_text())
    assert set(doc) >= {"segments_info", "iterations", "residual", "converged", "categories"}
    assert 1 <= doc["iterations"] <= 30
    ids = rgb_to_id(np.asarray(Image.open(tmp_path / f"{stem}_panoptic.png").convert("RGB")))
    assert ids.shape == (32, 32)
    assert set(np.unique(ids).tolist()) - {0} == {s["id"] for s in doc["segments_info"]}
    for seg in doc["segments_info"]:
        assert seg["area"] == int((ids == seg["id"]).sum())
        assert {"id", "category_id", "isthing", "area", "bbox", "score"} <= set(seg)
    assert Image.open(tmp_path / f"{stem}_overlay.png").size[0] >= 32


def test_predict_equals_library_call(model_file, dataset, tmp_path):
    from crbp_deploy.imageio import read_image

    image = sorted((dataset / "val" / "images").glob("*.png"))[1]
    _cli("predict", str(image), "--model", str(model_file), "--out", str(tmp_path), "--iters", "4")
    doc = json.loads((tmp_path / f"{image.stem}_panoptic.json").read_text())
    pred = PanopticPredictor.from_model(checkpoint.load(model_file)).predict([read_image(image)], iters=4)[0]
    assert doc["iterations"] == 4 == pred.iterations
    assert doc["segments_info"] == json.loads(json.dumps(pred.segments_info))


def test_odd_sizes_are_padded_and_cropped(model_file):
    predictor = PanopticPredictor.from_model(checkpoint.load(model_file))
    images = [np.random.default_rng(0).random((33, 47, 3), dtype=np.float32), np.zeros((16, 16, 3), np.float32)]
    preds = predictor.predict(images)
    assert preds[0].pan_ids.shape == (33, 47) and preds[1].pan_ids.shape == (16, 16)


@pytest.mark.parametrize(
    "content, match",
    [(b"", "empty input"), (b"just some text", "not an image")],
)
def test_predict_rejects_bad_images(model_file, tmp_path, content, match):
    bad = tmp_path / "bad.png"
    bad.write_bytes(content)
    r = _cli("predict", str(bad), "--model", str(model_file), "--out", str(tmp_path / "o"))
    assert r.returncode == 1 and match in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_predict_rejects_absurd_budget(model_file, dataset, tmp_path):
    image = sorted((dataset / "val" / "images").glob("*.png"))[0]
    r = _cli("predict", str(image), "--model", str(model_file), "--max-iters", "1000000", "--out", str(tmp_path))
    assert r.returncode == 1 and "max_iters=1000000 is outside" in r.stderr


def test_eval_json(model_file, dataset):
    r = _cli("eval", str(model_file), "--data", str(dataset), "--json", "--iters", "3")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    for key in ("pq", "sq", "rq"):
        assert set(res[key]) == {"all", "things", "stuff"}
    assert res["images"] == 5 and res["iterations"]["mean"] == 3
    assert set(map(int, res["per_class"])) <= {c["id"] for c in CATS}
    table = _cli("eval", str(model_file), "--data", str(dataset), "--per-class", "--iters", "3")
    assert table.returncode == 0 and "Panoptic quality" in table.stdout and "iterations: mean 3.0" in table.stdout


def test_eval_corrupt_dataset_names_file(model_file, tmp_path):
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "annotations.json").write_text("{not json")
    r = _cli("eval", str(model_file), "--data", str(tmp_path))
    assert r.returncode == 1 and "annotations.json" in r.stderr and "Traceback" not in r.stderr
