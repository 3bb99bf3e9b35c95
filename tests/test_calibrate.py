"""`crbp-deploy calibrate`: the choice rule, the sweep on a small model, the card it writes, bad input."""
import json

import pytest
import torch

from crbp_deploy import calibrate as cal
from crbp_deploy import checkpoint, zoo
from crbp_deploy.data.pathfinder import PathfinderConfig, write_dataset
from crbp_deploy.errors import InputError
from crbp_deploy.models import create_model, get_entry
from crbp_deploy.modelcard import resolve_budget

from conftest import benchmark_module


def point(quality, mean_iterations, iters=None, tol=None, policy=None):
    budget = {"iters": iters} if iters else {"max_iters": 40, "tol": tol}
    if policy:
        budget.update(tol=1e-4, policy=policy, threshold=0.5, patience=1)
    return cal.Point(budget, quality, mean_iterations)


SWEEP = [
    point(10.0, 1, iters=1), point(40.0, 5, iters=5), point(49.6, 10, iters=10), point(50.0, 20, iters=20),
    point(45.0, 4, tol=0.1), point(49.5, 7, tol=0.03), point(49.7, 9, tol=0.01), point(50.0, 14, tol=0.001),
]


def test_choose_the_fewest_steps_within_max_drop_of_the_best_fixed_count():
    c = cal.choose(SWEEP, max_drop=0.5)
    assert c["best_quality"] == 50.0 and c["within_max_drop"]
    assert c["budget"] == {"max_iters": 40, "tol": 0.03}  # 49.5 >= 50 - 0.5 at 7 steps; 0.1 (45.0) is too lossy
    assert c["fixed_baseline"]["iters"] == 10 and c["policy"] == "tol"  # smallest count >= 50 - 0.5
    c = cal.choose(SWEEP, max_drop=0.3)
    assert c["budget"]["tol"] == 0.01 and c["fixed_baseline"]["iters"] == 20
    c = cal.choose(SWEEP, max_drop=0.0)
    assert c["budget"]["tol"] == 0.001 and c["fixed_baseline"]["iters"] == 20
    c = cal.choose(SWEEP, max_drop=10)
    assert c["budget"]["tol"] == 0.1 and c["fixed_baseline"]["iters"] == 5
    c = cal.choose(SWEEP + [point(49.8, 6, policy="learned"), point(49.0, 3, policy="stable")], max_drop=0.5)
    assert c["policy"] == "learned" and c["mean_iterations"] == 6  # any policy; stable is too lossy


def test_choose_flags_when_no_budget_is_good_enough():
    c = cal.choose([point(60.0, 30, iters=30), point(50.0, 9, tol=0.01), point(52.0, 12, tol=0.001)], max_drop=0.5)
    assert not c["within_max_drop"] and c["budget"]["tol"] == 0.001 and c["fixed_baseline"]["iters"] == 30
    c = cal.choose([point(40.0, 5, iters=5), point(50.0, 9, tol=0.01)], max_drop=0.5)
    assert c["within_max_drop"] and c["budget"]["tol"] == 0.01 and c["fixed_baseline"]["iters"] == 5


def test_frontier_keeps_only_pareto_points():
    front = cal.frontier(SWEEP)
    assert [(p.quality, p.mean_iterations) for p in front] == [(10.0, 1), (45.0, 4), (49.5, 7), (49.7, 9), (50.0, 14)]


def test_the_cap_is_the_one_the_card_was_calibrated_under():
    model = create_model("hgru-pathfinder", get_entry("hgru-pathfinder").tiny)
    model.meta = {"training": {"steps": 40}}
    assert cal.default_max_iters(model, None) == 160  # 4x the training steps
    model.meta["inference"] = {"budget": {"max_iters": 40, "tol": 1e-4}}
    assert cal.default_max_iters(model, None) == 40
    model.meta["inference"]["calibration"] = {"cap": 160}  # the budget's cap was a swept quarter of it
    assert cal.default_max_iters(model, None) == 160


def test_options_are_checked():
    for kwargs, match in (({"max_drop": -0.1}, "--max-drop"), ({"tols": []}, "--tols"),
                          ({"fixed": [0]}, "--fixed"), ({"max_iters": 0}, "--max-iters")):
        args = {"max_drop": 0.5, "fixed": [1], "tols": [0.1], "max_iters": None, **kwargs}
        with pytest.raises(InputError, match=match):
            cal.check_options(**args)
    assert cal.parse_list("1, 2,5", int, "--fixed") == [1, 2, 5]
    with pytest.raises(InputError, match="--tols"):
        cal.parse_list("0.1,x", float, "--tols")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pf")
    write_dataset(root, PathfinderConfig(length=6), count=6, seed=2, progress=False, lengths=[6, 9])
    return root


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("hgru-pathfinder", get_entry("hgru-pathfinder").tiny)
    return checkpoint.save(model, tmp_path_factory.mktemp("ckpt") / "pf.pt",
                           meta={"inference": {"budget": {"max_iters": 6, "tol": 0.5}, "postprocess": {"x": 1}}})


def test_calibrate_a_small_model_and_write_the_card(data, ckpt):
    model = checkpoint.load(ckpt)
    res = cal.calibrate(model, data, fixed=[1, 3, 6], tols=[0.3, 0.05, 0.001], max_drop=0.5, latency=False)
    assert res["task"] == "pathfinder" and res["metric"] == "IoU" and res["images"] == 6
    assert [p["budget"] for p in res["sweep"]][:6] == [{"iters": n} for n in range(1, 7)]  # every count to the cap
    early = [p for p in res["sweep"] if "tol" in p["budget"]]
    assert {p["budget"]["max_iters"] for p in early} == {6, 3, 1}  # the card's cap, its half and its quarter
    assert {p["budget"].get("policy", "tol") for p in early} == {"tol", "estimate", "stable"}  # no head: no learned
    # the choice follows the rule on the sweep: fewest mean steps within max_drop of the best fixed count
    best = max(p["quality"] for p in res["sweep"] if "iters" in p["budget"])
    ok = [p for p in early if p["quality"] >= best - 0.5 - 1e-9]
    if ok:
        assert res["mean_iterations"] == pytest.approx(min(p["mean_iterations"] for p in ok), abs=1e-4)
    assert res["oracle"]["mean_iterations"] <= 6
    # the trace's quality equals a plain eval of the same budget (one evaluation path); the end-to-end check too
    from crbp_deploy.tasks import scorer_for

    scorer = scorer_for(model, data)
    assert res["sweep"][2]["quality"] == pytest.approx(round(scorer.quality(scorer.evaluate(iters=3)), 4), abs=1e-3)
    chosen = res["check"]["chosen"]
    assert chosen["quality"] == pytest.approx(res["quality"], abs=1e-3)
    assert chosen["mean_iterations"] == pytest.approx(res["mean_iterations"], abs=1e-3)
    meta = cal.card_meta(model.meta, res)
    json.dumps(meta)
    assert resolve_budget(meta).kwargs() == res["budget"] and meta["inference"]["postprocess"] == {"x": 1}
    assert meta["inference"]["calibration"]["sweep"] == res["sweep"]


def test_cli_writes_a_calibrated_copy_json_and_plot(data, ckpt, tmp_path, run_cli):
    before = ckpt.read_bytes()
    out, png = tmp_path / "cal.pt", tmp_path / "cal.png"
    code, stdout, err = run_cli("calibrate", str(ckpt), "--data", str(data), "--fixed", "1,4",
                                "--tols", "0.2,0.01", "--out", str(out), "--plot", str(png), "--json", "--no-latency")
    assert code == 0, err
    res = json.loads(stdout)
    assert res["written"] == str(out) and png.stat().st_size > 0 and ckpt.read_bytes() == before
    assert checkpoint.load(out).meta["inference"]["budget"] == res["budget"]
    assert res["fixed_baseline"] is None or res["fixed_baseline"]["iters"] in (1, 4)
    code, stdout, err = run_cli("calibrate", str(out), "--data", str(data), "--fixed", "1",
                                "--tols", "0.2", "--dry-run", "--max-iters", "4")
    assert code == 0, err
    assert "chosen" in stdout and "oracle" in stdout


@pytest.mark.parametrize("case, match", [
    ("max_drop", "--max-drop must be a number >= 0"),
    ("empty", "no Pathfinder data"),
    ("panoptic_data", "holds COCO panoptic data"),
    ("pathfinder_data", "holds Pathfinder data"),
    ("bundled_out", "bundled model inside the package"),
])
def test_cli_bad_input_one_line_nothing_written(case, match, data, ckpt, tmp_path, run_cli, one_error_line):
    model, folder, out = str(ckpt), tmp_path / "data", tmp_path / "cal.pt"
    folder.mkdir()
    extra = []
    if case == "max_drop":
        folder, extra = data, ["--max-drop", "-1"]
    elif case == "panoptic_data":
        (folder / "annotations.json").write_text("{}")
    elif case == "pathfinder_data":
        model, folder = "crbp-panoptic", data
    elif case == "bundled_out":
        folder, out = data, zoo.path("crbp-panoptic")
    before = out.read_bytes() if out.exists() else None
    code, _, err = run_cli("calibrate", model, "--data", str(folder), "--fixed", "1", "--tols",
                           "0.1", "--out", str(out), "--plot", str(tmp_path / "p.png"), *extra)
    one_error_line(code, err, match)
    assert (out.read_bytes() if out.exists() else None) == before
    assert not (tmp_path / "p.png").exists()


def test_halting_report_compares_at_equal_steps():
    """The report's equal-compute comparison: the fixed-count curve interpolated at the policy's mean steps."""
    report = benchmark_module("halting_report")
    sweep = [{"budget": {"iters": n}, "quality": q, "mean_iterations": n} for n, q in ((10, 60.0), (20, 70.0), (40, 71.0))]
    sweep.append({"budget": {"max_iters": 40, "tol": 1e-4}, "quality": 69.0, "mean_iterations": 15.0})
    rec = {"sweep": sweep, "oracle": {"mean_iterations": 12.0}}
    assert report.fixed_at_steps(rec, 15.0) == {"iters": 15.0, "quality": 65.0, "between": [10, 20]}
    assert report.fixed_at_steps(rec, 20.0)["quality"] == 70.0
    assert report.fixed_at_steps(rec, 50.0) is None
    result = {"calibration_on_these_images": rec, "fixed_baseline": {"iters": 20, "quality": 70.0, "mean_iterations": 20},
              "shipped_point": {"end_to_end": {"quality": 69.0, "mean_iterations": 15.0}}}
    goals = report.goals(result)
    assert goals["quality_vs_equal_steps"] == 4.0 and goals["quality_delta"] == -1.0
    assert goals["steps_ratio"] == round(20 / 15, 3) and goals["saving_captured"] == round(5 / 8, 3)
