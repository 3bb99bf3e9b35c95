"""benchmarks/gradient_check.py: the trainer's gradient against a converged reference, per contour length."""
import json

import pytest
import torch
from conftest import benchmark_module

from crbp_deploy import checkpoint
from crbp_deploy.data.pathfinder import PathfinderConfig, write_dataset
from crbp_deploy.models import create_model

RECORD = {"task": "pathfinder", "grad": "crbp", "steps": 6, "neumann_steps": 4, "forward_tol": 3e-3,
          "forward_solver": "anderson", "backward_solver": "anderson", "backward_tol": 0.02, "loss": "bce"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("gradcheck")
    write_dataset(root / "data" / "train", PathfinderConfig(length=6, size=40, distractors=1), 6, seed=0,
                  progress=False, lengths=[6, 9])
    torch.manual_seed(0)
    model = create_model("hgru-pathfinder", {"channels": 4, "kernel_size": 3, "input_kernel": 3})
    checkpoint.save(model, root / "model.pt", meta={"training": RECORD})
    return root


def test_per_length_cosines_against_the_converged_implicit_gradient(trained, tmp_path):
    bench = benchmark_module("gradient_check")
    out = tmp_path / "check.json"
    assert bench.main(["--model", str(trained / "model.pt"), "--data", str(trained / "data"), "--lengths", "6,9",
                       "--images", "2", "--reference", "implicit", "--reference-steps", "200", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["as_trained"]["forward_solver"] == "anderson" and report["as_trained"]["steps"] == 6
    assert set(report["per_length"]) == {"6", "9"}
    for result in report["per_length"].values():
        assert result["images"] == 2 and result["reference_residual_max"] < 1e-5
        # at the fixed point, with the series run long, the trainer's path is the converged gradient
        assert result["crbp_forward_converged_60_terms"]["cosine"] > 0.999
        assert result["crbp_as_trained"]["mean_forward_steps"] <= 5  # capped at steps - 1
        assert result["crbp_forward_cap_x3"]["mean_forward_steps"] <= 17
        # this untrained model's forward is far from its fixed point at 5 steps: a higher cap gives a better gradient
        assert result["crbp_as_trained"]["cosine"] < result["crbp_forward_cap_x3"]["cosine"]
        assert -1 <= result["one_step_backprop"]["cosine"] <= 1


def test_a_length_the_data_lacks_is_one_clear_error(trained):
    bench = benchmark_module("gradient_check")
    with pytest.raises(SystemExit, match="no images of contour length 25"):
        bench.main(["--model", str(trained / "model.pt"), "--data", str(trained / "data"), "--lengths", "25"])
