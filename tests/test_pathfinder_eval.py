"""Pathfinder evaluation: IoU / F1 overall and per length, iterations per length, Spearman; `crbp-deploy eval`."""
import json
import math

import numpy as np
import pytest
import torch

from crbp_deploy import checkpoint
from crbp_deploy.data.pathfinder import PathfinderConfig, PathfinderFolder, write_dataset
from crbp_deploy.errors import InputError
from crbp_deploy.models import create_model, get_entry
from crbp_deploy.tasks import PANOPTIC, PATHFINDER
from crbp_deploy.tasks.pathfinder import average_ranks, pixel_counts, scores, spearman

from conftest import benchmark_module

LENGTHS = [6, 9, 14]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    root = tmp_path_factory.mktemp("pf")
    write_dataset(root / "val", PathfinderConfig(length=6), count=9, seed=1, progress=False, lengths=LENGTHS)
    return root


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("hgru-pathfinder", get_entry("hgru-pathfinder").tiny)
    return checkpoint.save(model, tmp_path_factory.mktemp("ckpt") / "pf.pt", meta={"training": "none"})


def oracle(folder, iterations_of, flip=False):
    """A runner that answers with the true masks (or their complement) and chosen iteration counts."""
    seen = [0]

    def run(images, **budget):
        n, start = len(images), seen[0]
        seen[0] += n
        masks = np.stack([folder.load(i)[1] for i in range(start, start + n)])
        if flip:
            masks = ~masks
        logits = np.stack([~masks, masks], axis=1).astype(np.float32)
        its = np.array([iterations_of(i) for i in range(start, start + n)])
        return {"logits": logits, "iterations": its, "residual": np.full(n, 1e-4)}

    return run


def test_spearman_against_a_hand_example():
    assert average_ranks([10, 20, 20, 5]).tolist() == [2.0, 3.5, 3.5, 1.0]
    # x ranks 1..5; y = 5, 6, 7, 8, 7 -> ranks 1, 2, 3.5, 5, 3.5: rho = 8 / sqrt(10 * 9.5)
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / math.sqrt(95))
    assert spearman([1, 2, 3], [3, 9, 27]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [4, 4, 4]) is None


def test_pixel_scores():
    true = np.zeros((1, 4, 4), bool)
    true[0, 0, :2] = True  # 2 pixels
    pred = np.zeros((1, 4, 4), bool)
    pred[0, 0, 1:4] = True  # 1 hit, 2 false positives, 1 miss
    counts = pixel_counts(pred, true)
    assert counts.tolist() == [[1, 2, 1]]
    assert scores(counts) == pytest.approx({"iou": 1 / 4, "f1": 2 / 5})


def test_perfect_prediction_and_iterations_per_length(mixed):
    folder = PATHFINDER.open(mixed)  # the root: its val/ is found
    assert isinstance(folder, PathfinderFolder) and folder.lengths == LENGTHS * 3
    res = PATHFINDER.evaluate(oracle(folder, lambda i: 2 * folder.lengths[i]), folder, batch_size=4,
                             max_iters=60, tol=1e-3)
    assert res["iou"] == 1.0 and res["f1"] == 1.0 and res["images"] == 9
    assert set(res["per_length"]) == {"6", "9", "14"}
    for n, r in res["per_length"].items():
        assert r["images"] == 3 and r["iou"] == 1.0 and r["mean_iterations"] == 2 * int(n)
    assert res["spearman_length_iterations"] == pytest.approx(1.0)
    assert res["iterations"]["converged_fraction"] == 1.0 and res["iterations"]["max"] == 28


def test_wrong_prediction_scores_zero_and_limit(mixed):
    folder = PATHFINDER.open(mixed / "val")
    res = PATHFINDER.evaluate(oracle(folder, lambda i: 5, flip=True), folder, limit=4, iters=5)
    assert res["iou"] == 0.0 and res["f1"] == 0.0 and res["images"] == 4
    assert res["per_length"]["6"]["images"] == 2 and res["spearman_length_iterations"] is None
    assert res["iterations"]["converged_fraction"] == 0.0


def test_data_errors(tmp_path, mixed):
    with pytest.raises(InputError, match="no such dataset folder"):
        PATHFINDER.open(tmp_path / "nope")
    with pytest.raises(InputError, match="no Pathfinder data"):
        PATHFINDER.open(tmp_path)
    (tmp_path / "annotations.json").write_text("{}")
    with pytest.raises(InputError, match="holds COCO panoptic data"):
        PATHFINDER.open(tmp_path)
    with pytest.raises(InputError, match="holds Pathfinder data"):
        PANOPTIC.open(mixed)


def test_cli_eval_pathfinder_json(mixed, tiny_ckpt, run_cli):
    code, out, err = run_cli("eval", str(tiny_ckpt), "--data", str(mixed), "--max-iters", "6",
                             "--tol", "0.05", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["budget"] == {"max_iters": 6, "tol": 0.05} and res["images"] == 9
    assert set(res["per_length"]) == {"6", "9", "14"} and 0 <= res["iou"] <= 1 and 0 <= res["f1"] <= 1
    assert all(1 <= r["mean_iterations"] <= 6 for r in res["per_length"].values())
    code, out, err = run_cli("eval", str(tiny_ckpt), "--data", str(mixed), "--iters", "2")
    assert code == 0, err
    assert "IoU" in out and "Spearman" in out and "14" in out


@pytest.mark.parametrize("case, match", [("empty", "no Pathfinder data"), ("panoptic", "holds COCO panoptic data")])
def test_cli_eval_bad_data_one_line(case, match, tmp_path, tiny_ckpt, run_cli, one_error_line):
    if case == "panoptic":
        (tmp_path / "annotations.json").write_text("{}")
    code, _, err = run_cli("eval", str(tiny_ckpt), "--data", str(tmp_path), "--iters", "2")
    one_error_line(code, err, match)


def test_cli_eval_panoptic_model_on_pathfinder_data(mixed, run_cli, one_error_line):
    code, _, err = run_cli("eval", "crbp-panoptic", "--data", str(mixed), "--iters", "2")
    one_error_line(code, err, "holds Pathfinder data")


def test_proximity_fill_jumps_only_its_gap():
    """The proximity baseline of benchmarks/pathfinder_claims.py: a flood from the seed that jumps gaps of up
    to 2 * reach pixels, one pixel per step."""
    claims = benchmark_module("pathfinder_claims")
    drawn = np.zeros((1, 5, 14), bool)
    drawn[0, 2, [0, 1, 4, 5, 9, 10]] = True  # a 2-pixel gap at 2-3, a 3-pixel gap at 6-8
    seeds = np.zeros_like(drawn)
    seeds[0, 2, 0] = True
    steps = claims.flood_steps(drawn, seeds, reach=1)[0, 2]
    assert steps[[0, 1, 4, 5]].tolist() == [0, 1, 4, 5] and (steps[[9, 10]] == -1).all()
    assert (steps[~drawn[0, 2]] == -1).all()
    assert claims.proximity_fill(drawn, seeds, reach=2)[0, 2, [9, 10]].all()
    assert claims.proximity_fill(drawn, seeds, reach=1).sum() == 4
