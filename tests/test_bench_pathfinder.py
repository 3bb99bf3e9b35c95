"""`crbp-deploy bench` on a Pathfinder model: IoU (x 100) on mixed contour lengths instead of PQ."""
import pytest
import torch

from crbp_deploy.bench import run_bench, to_markdown
from crbp_deploy.models import create_model, get_entry


@pytest.mark.slow  # two ONNX exports: about 17 s on this CPU
def test_bench_runs_a_pathfinder_model_on_generated_mixed_lengths(tmp_path):
    torch.manual_seed(0)
    model = create_model("hgru-pathfinder", get_entry("hgru-pathfinder").tiny).eval()
    model.meta = {"inference": {"budget": {"max_iters": 4, "tol": 0.2}}}
    said = []
    res = run_bench(model, threads=1, repeats=1, limit=8, workdir=tmp_path, progress=said.append)
    assert res["metric"] == "IoU" and res["setup"]["images"] == 8
    rows = {(r["backend"], r["strategy"]): r for r in res["rows"] if r["precision"] == "fp32"}
    assert len(rows) >= 6 and all(0 <= r["quality"] <= 100 for r in res["rows"])
    # every row says its precision, residual and useful GFLOP/s against the peak measured at start
    assert res["peak_gflops"]["fp32"] > 0 and res["gflop_per_step"] > 0
    assert all(r["gflops_b8"] > 0 and 0 < r["peak_fraction_b8"] < 1 and r["median_residual"] >= 0 for r in res["rows"])
    assert {r["precision"] for r in res["rows"]} >= {"fp32"}
    # the same model at the same budget scores the same on every runtime
    fixed = rows[("torch eager", "fixed")]
    assert rows[("onnxruntime", "unrolled")]["quality"] == fixed["quality"]
    assert rows[("onnxruntime", "loop, early exit")]["quality"] == rows[("torch eager", "early exit")]["quality"]
    assert res["fixed_count_matching_early_exit"] in res["fixed_quality"]
    # no calibration in the card: the fixed count is searched on this data, and the output says so
    assert res["fixed_baseline_source"] == "uncalibrated" and any(s.startswith("uncalibrated: ") for s in said)
    assert "IoU x 100" in to_markdown(res)
    # the held-out set mixes contour lengths
    import json

    assert json.loads((tmp_path / "data" / "index.json").read_text())["lengths"] == [6, 9, 14, 20, 25]


def test_bench_times_early_exit_against_the_calibrated_fixed_baseline_of_the_card():
    """A calibrated card's `fixed_baseline` is used as is (nothing re-derived, nothing scored); an uncalibrated
    card is said to be one."""
    from crbp_deploy.bench import _fixed_baseline, _Setup

    model = create_model("hgru-pathfinder", get_entry("hgru-pathfinder").tiny).eval()
    model.meta = {"inference": {"budget": {"max_iters": 4, "tol": 0.2}, "calibration": {
        "fixed_baseline": {"iters": 7, "quality": 41.5, "mean_iterations": 7.0}}}}
    said = []
    setup = _Setup(model, "IoU", None, 8, [], [], 1, 0.0, {}, said.append)
    assert _fixed_baseline(setup, None, q_early=50.0) == (7, {}, "calibrated")
    assert said == ["fixed baseline from the card's calibration: 7 iterations (IoU 41.50 on the calibration data)"]
