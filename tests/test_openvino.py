"""The OpenVINO backend on the bundled panoptic model: a real OpenVINO Core reading our ONNX exports
(the compacted early-exit Loop included). Skipped, saying how to install it, where openvino is absent."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("openvino", reason="openvino is not installed: pip install 'crbp-deploy[openvino]' (make setup does)")

from crbp_deploy.export import export_onnx  # noqa: E402
from crbp_deploy.export.verify import sample_images, verify  # noqa: E402
from crbp_deploy.precision import TOLERANCES  # noqa: E402
from crbp_deploy.runtime import TorchBackend, load_backend  # noqa: E402
from crbp_deploy.runtime import openvino_backend  # noqa: E402
from crbp_deploy.sources import resolve_model  # noqa: E402

BUDGET = {"max_iters": 80, "tol": 0.03}  # the bundled card's


def _ov_has_bf16() -> bool:
    import openvino as ov

    return "BF16" in openvino_backend.capabilities(ov.Core())


#: what this CPU reports decides, not which CPU the suite was written on (AMX, AVX512-BF16, or neither)
needs_ov_bf16 = pytest.mark.skipif(not _ov_has_bf16(), reason="OpenVINO reports no BF16 capability on this CPU")


@pytest.fixture(scope="module")
def bundled():
    return resolve_model(None)[0]


@pytest.fixture(scope="module")
def loop_path(bundled, tmp_path_factory):
    path = tmp_path_factory.mktemp("ov") / "loop.onnx"
    return export_onnx(bundled, path, strategy="loop", execution="compact", **BUDGET).path


@pytest.fixture(scope="module")
def reference(bundled):
    return TorchBackend(bundled)


def test_compacted_loop_matches_torch_per_sample(loop_path, reference):
    """fp32: heads within ONNX Runtime's tolerances and identical per-sample iterations, on a batch whose
    samples stop at different steps (the compacted body shrinks the batch inside the Loop)."""
    ov = load_backend(loop_path, "openvino", threads=1)
    x = sample_images(6, 3, (48, 64), seed=3)
    counts = []
    for budget in (BUDGET, {"max_iters": 60, "tol": 0.01}):  # the budget is a per-call input, not a constant
        ref, got = reference.run(x, **budget), ov.run(x, **budget)
        assert len(set(ref["iterations"].tolist())) > 1, "the samples must need different budgets"
        np.testing.assert_array_equal(got["iterations"], ref["iterations"])
        counts.append(got["iterations"].tolist())
        for head in ref.heads:
            np.testing.assert_allclose(got[head], ref[head], atol=1e-4, rtol=1e-3)
    assert counts[0] != counts[1]
    assert got.telemetry["backend"] == "openvino" and got.telemetry["precision"] == "fp32"


def test_unrolled_artifact_runs_its_fixed_count(bundled, reference, tmp_path):
    path = export_onnx(bundled, tmp_path / "u.onnx", strategy="unrolled", iters=6).path
    ov = load_backend(path, "ov", threads=1)
    x = sample_images(2, 3, (32, 32), seed=5)
    got, ref = ov.run(x), reference.run(x, iters=6)
    assert got["iterations"].tolist() == [6, 6]
    np.testing.assert_allclose(got["semantic"], ref["semantic"], atol=1e-4, rtol=1e-3)


@needs_ov_bf16
def test_bf16_within_documented_tolerance_and_pq_parity(bundled, loop_path):
    """bf16 (AMX): verify with the bf16 tolerances, including PQ parity on a generated split."""
    from crbp_deploy.data.panoptic_synth import write_dataset
    from crbp_deploy.export.verify import pq_parity_check

    ov = load_backend(loop_path, "openvino", threads=1, precision="bf16")
    assert ov.precision == "bf16"
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        write_dataset(Path(tmp) / "pq", count=12, size=64, seed=2024, val_fraction=1.0, progress=None)
        check = pq_parity_check(Path(tmp) / "pq" / "val", bundled.meta, limit=12, max_delta=TOLERANCES["bf16"].pq)
        report = verify(loop_path, bundled, backend=ov, sizes=[(64, 64)], batches=[4], checks=[check], write=False)
    assert report.passed and report.precision == "bf16"
    assert report.worst["semantic"]["max_abs"] > 0  # it really ran in bf16 (fp32 agrees to ~1e-5)
    assert abs(report.checks[0]["delta_pq"]) <= TOLERANCES["bf16"].pq


def test_precision_this_cpu_lacks_is_refused(loop_path, monkeypatch):
    monkeypatch.setattr(openvino_backend, "capabilities", lambda core, device="CPU": ["FP32", "INT8"])
    with pytest.raises(Exception, match="OpenVINO cannot run bf16 on this CPU"):
        load_backend(loop_path, "openvino", precision="bf16")


def test_cli_verify_on_openvino(loop_path, run_cli):
    code, out, err = run_cli("verify", loop_path, "--backend", "openvino")
    assert code == 0, err
    assert "verify PASSED" in out and "openvino fp32" in out and "pq_parity" in out


def test_cli_missing_openvino_is_one_line(loop_path, run_cli, one_error_line, monkeypatch):
    monkeypatch.setattr(openvino_backend, "is_available", lambda: False)
    code, _, err = run_cli("verify", loop_path, "--backend", "openvino")
    one_error_line(code, err, "pip install 'crbp-deploy[openvino]'")
    code, _, err = run_cli("verify", loop_path, "--backend", "onnxruntime", "--precision", "bf16")
    one_error_line(code, err, "use --backend openvino for bf16")


@needs_ov_bf16
def test_cli_predict_on_openvino_bf16(run_cli, tmp_path):
    from PIL import Image

    from crbp_deploy.data.panoptic_synth import write_dataset

    write_dataset(tmp_path / "d", count=2, size=64, seed=1, val_fraction=1.0, progress=None)
    image = sorted((tmp_path / "d" / "val" / "images").iterdir())[0]
    Image.open(image)  # a real image file
    code, out, err = run_cli("predict", image, "--backend", "openvino", "--precision", "bf16", "--out", tmp_path / "p")
    assert code == 0, err
    assert "segments" in out and (tmp_path / "p" / f"{image.stem}_panoptic.json").is_file()


@needs_ov_bf16
def test_serving_config_selects_openvino(loop_path):
    from crbp_deploy.errors import ConfigError
    from crbp_deploy.serving.service import PanopticService, ServiceConfig

    service = PanopticService(loop_path, ServiceConfig(backend="openvino", precision="bf16"))
    assert service.describe()["backend"] == "openvino" and service.backend.precision == "bf16"
    with pytest.raises(ConfigError, match="backend must be one of"):
        ServiceConfig(backend="coreml")
    with pytest.raises(ConfigError, match="precision must be one of"):
        ServiceConfig(precision="int4")
