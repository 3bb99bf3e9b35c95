"""`crbp-deploy export` / `verify` end to end on a small trained-shaped panoptic checkpoint."""
import json
import subprocess
import sys

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


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "crbp_deploy.cli", *args], capture_output=True, text=True, timeout=600)


def test_export_early_exit_default_verifies_with_pq_parity(model_file, tmp_path):
    out = tmp_path / "m.onnx"
    r = _cli("export", str(model_file), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "verify PASSED" in r.stdout and '"delta_pq": 0.0' in r.stdout
    sidecar = json.loads(out.with_name("m.onnx.json").read_text())
    assert sidecar["strategy"] == "loop" and sidecar["defaults"] == {"max_iters": 25, "tol": 0.01}
    assert sidecar["verification"]["passed"] is True
    assert any(c["name"] == "pq_parity" and c["passed"] for c in sidecar["verification"]["checks"])
    overridable = {i.name for i in ort.InferenceSession(str(out)).get_overridable_initializers()}
    assert {"max_iters", "tol"} <= overridable


def test_export_fixed_count_unrolled_and_postprocess(model_file, tmp_path):
    out = tmp_path / "u.onnx"
    r = _cli("export", str(model_file), "--iters", "5", "--postprocess", "--out", str(out))
    assert r.returncode == 0, r.stderr
    sidecar = json.loads(out.with_name("u.onnx.json").read_text())
    assert sidecar["strategy"] == "unrolled"
    assert "panoptic" in [o["name"] for o in sidecar["outputs"]]
    again = _cli("verify", str(out), "--against", str(model_file))
    assert again.returncode == 0 and "verify PASSED" in again.stdout, again.stdout + again.stderr


def test_verify_fails_loudly_against_another_model(model_file, tmp_path):
    out = tmp_path / "m.onnx"
    assert _cli("export", str(model_file), "--out", str(out), "--no-verify").returncode == 0
    torch.manual_seed(1)
    other = create_model("hgru-panoptic", num_classes=4, thing_classes=[0, 1], **TINY)
    other_file = checkpoint.save(other, tmp_path / "other.pt", meta=checkpoint.load(model_file).meta)
    r = _cli("verify", str(out), "--against", str(other_file))
    assert r.returncode == 1 and "FAILED" in r.stderr + r.stdout and "max abs" in r.stderr + r.stdout


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
def test_export_bad_options(model_file, tmp_path, args, message):
    r = _cli("export", str(model_file), "--out", str(tmp_path / "x.onnx"), *args)
    assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_export_unwritable_and_bad_checkpoint(model_file, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("a file where a folder would have to be")
    r = _cli("export", str(model_file), "--out", str(blocker / "x.onnx"))
    assert r.returncode == 1 and "cannot write" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00" * 100)
    r = _cli("export", str(bad), "--out", str(tmp_path / "y.onnx"))
    assert r.returncode == 1 and "not a checkpoint" in r.stderr
    assert not (tmp_path / "y.onnx").exists()


def test_export_loop_body_compact_by_default_masked_on_request(model_file, tmp_path):
    compact, masked = tmp_path / "c.onnx", tmp_path / "m.onnx"
    r = _cli("export", str(model_file), "--out", str(compact), "--no-verify")
    assert r.returncode == 0 and "(compact)" in r.stdout, r.stdout + r.stderr
    assert json.loads(compact.with_name("c.onnx.json").read_text())["execution"] == "compact"
    r = _cli("export", str(model_file), "--loop", "masked", "--out", str(masked))
    assert r.returncode == 0 and "verify PASSED" in r.stdout, r.stdout + r.stderr
    assert json.loads(masked.with_name("m.onnx.json").read_text())["execution"] == "masked"
    bad = _cli("export", str(model_file), "--iters", "5", "--loop", "masked", "--out", str(tmp_path / "x.onnx"))
    assert bad.returncode == 1 and "--loop applies to the loop strategy" in bad.stderr + bad.stdout
    assert not (tmp_path / "x.onnx").exists()
    odd = _cli("export", str(model_file), "--loop", "lazy", "--out", str(tmp_path / "y.onnx"))
    assert odd.returncode == 1 and "--loop must be compact or masked, got 'lazy'" in odd.stderr + odd.stdout
