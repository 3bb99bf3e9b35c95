"""`crbp-deploy export` / `verify` end to end on a small trained-shaped panoptic checkpoint."""
import json

import onnxruntime as ort
import pytest
import torch

from crbp_deploy import checkpoint
from crbp_deploy.data.panoptic_synth import CATEGORIES
from crbp_deploy.models import create_model

TINY = {"encoder_channels": 8, "channels": 6, "kernel_size": 3, "head_channels": 8, "downsample": 1}


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("hgru-panoptic", num_classes=4, thing_classes=[0, 1], **TINY)
    meta = {"categories": sorted(CATEGORIES, key=lambda c: c["id"]),
            "inference": {"budget": {"max_iters": 25, "tol": 1e-2}, "postprocess": {"min_area": 4}},
            "evaluation": {"image_size": 32}}
    return checkpoint.save(model, tmp_path_factory.mktemp("m") / "tiny.pt", meta=meta)


def test_export_early_exit_default_verifies_with_pq_parity(model_file, tmp_path, run_cli):
    out = tmp_path / "m.onnx"
    code, stdout, err = run_cli("export", model_file, "--out", out)
    assert code == 0, err
    assert "verify PASSED" in stdout and '"delta_pq": 0.0' in stdout
    sidecar = json.loads(out.with_name("m.onnx.json").read_text())
    assert sidecar["strategy"] == "loop" and sidecar["defaults"] == {"max_iters": 25, "tol": 0.01}
    assert sidecar["verification"]["passed"] is True
    assert any(c["name"] == "pq_parity" and c["passed"] for c in sidecar["verification"]["checks"])
    overridable = {i.name for i in ort.InferenceSession(str(out)).get_overridable_initializers()}
    assert {"max_iters", "tol"} <= overridable


def test_export_fixed_count_unrolled_and_postprocess(model_file, tmp_path, run_cli):
    out = tmp_path / "u.onnx"
    # verified once, by `verify` below (export-time verification is the default path's test)
    code, _, err = run_cli("export", model_file, "--iters", "5", "--postprocess", "--out", out, "--no-verify")
    assert code == 0, err
    sidecar = json.loads(out.with_name("u.onnx.json").read_text())
    assert sidecar["strategy"] == "unrolled"
    assert "panoptic" in [o["name"] for o in sidecar["outputs"]]
    code, stdout, err = run_cli("verify", out, "--against", model_file)
    assert code == 0 and "verify PASSED" in stdout, stdout + err


def test_verify_fails_loudly_against_another_model(model_file, tmp_path, run_cli):
    out = tmp_path / "m.onnx"
    assert run_cli("export", model_file, "--out", out, "--no-verify")[0] == 0
    torch.manual_seed(1)
    other = create_model("hgru-panoptic", num_classes=4, thing_classes=[0, 1], **TINY)
    other_file = checkpoint.save(other, tmp_path / "other.pt", meta=checkpoint.load(model_file).meta)
    code, stdout, err = run_cli("verify", out, "--against", other_file)
    assert code == 1 and "FAILED" in err + stdout and "max abs" in err + stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--iters", "0"], "iters=0 is outside"),
        (["--max-iters", "5", "--tol", "-1"], "tol must be a finite number"),
        (["--iters", "3", "--tol", "0.1"], "exclude each other"),
        (["--format", "tensorrt"], "TensorRT"),
        (["--size", "big"], "--size must look like"),
    ],
)
def test_export_bad_options(model_file, tmp_path, args, message, run_cli, one_error_line):
    code, _, err = run_cli("export", model_file, "--out", tmp_path / "x.onnx", *args)
    one_error_line(code, err, message)
    assert list(tmp_path.iterdir()) == []


def test_export_unwritable_and_bad_checkpoint(model_file, tmp_path, run_cli, one_error_line):
    blocker = tmp_path / "a-file"
    blocker.write_text("a file where a folder would have to be")
    code, _, err = run_cli("export", model_file, "--out", blocker / "x.onnx")
    one_error_line(code, err, "cannot write")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00" * 100)
    code, _, err = run_cli("export", bad, "--out", tmp_path / "y.onnx")
    one_error_line(code, err, "not a checkpoint")
    assert not (tmp_path / "y.onnx").exists()


def test_export_loop_body_compact_by_default_masked_on_request(model_file, tmp_path, run_cli, one_error_line):
    compact, masked = tmp_path / "c.onnx", tmp_path / "m.onnx"
    code, stdout, err = run_cli("export", model_file, "--out", compact, "--no-verify")
    assert code == 0 and "(compact)" in stdout, stdout + err
    assert json.loads(compact.with_name("c.onnx.json").read_text())["execution"] == "compact"
    code, stdout, err = run_cli("export", model_file, "--loop", "masked", "--out", masked)
    assert code == 0 and "verify PASSED" in stdout, stdout + err
    assert json.loads(masked.with_name("m.onnx.json").read_text())["execution"] == "masked"
    code, _, err = run_cli("export", model_file, "--iters", "5", "--loop", "masked", "--out", tmp_path / "x.onnx")
    one_error_line(code, err, "--loop applies to the loop strategy")
    assert not (tmp_path / "x.onnx").exists()
    code, _, err = run_cli("export", model_file, "--loop", "lazy", "--out", tmp_path / "y.onnx")
    one_error_line(code, err, "--loop must be compact or masked, got 'lazy'")
