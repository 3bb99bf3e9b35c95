import numpy as np
import onnx
import pytest
import torch

from crbp_deploy import checkpoint
from crbp_deploy.errors import CrbpError, InputError
from crbp_deploy.export import export_onnx
from crbp_deploy.runtime import (
    DEFAULT_MAX_ITERS,
    DEFAULT_TOL,
    Backend,
    OrtBackend,
    RunResult,
    TorchBackend,
    load_backend,
)

from conftest import tiny_model

CONTRASTS = np.array([0.05, 0.3, 0.7, 1.0], dtype=np.float32).reshape(4, 1, 1, 1)


def images(batch=2, size=(16, 16), seed=0, channels=1):
    return np.random.default_rng(seed).random((batch, channels, *size), dtype=np.float32)


@pytest.fixture(scope="module")
def model():
    return tiny_model("hgru-pathfinder")


@pytest.fixture(scope="module")
def artifacts(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("runtime")
    loop = export_onnx(model, folder / "loop.onnx", max_iters=40, tol=1e-2, example_size=(16, 16))
    unrolled = export_onnx(model, folder / "unrolled.onnx", strategy="unrolled", iters=3, example_size=(16, 16))
    return {"loop": loop.path, "unrolled": unrolled.path}


def test_torch_backend_runs_both_budgets(model):
    backend = TorchBackend(model)
    assert backend.default_budget.kwargs() == {"max_iters": DEFAULT_MAX_ITERS, "tol": DEFAULT_TOL}
    result = backend.run(images(4) * CONTRASTS, max_iters=40, tol=1e-2)
    assert isinstance(result, RunResult) and set(result) == {"logits", "iterations", "residual"}
    assert result["iterations"].dtype == np.int64 and result["residual"].dtype == np.float32
    assert set(result.heads) == {"logits"}
    tele = result.telemetry
    assert tele["backend"] == "torch" and tele["budget"] == {"max_iters": 40, "tol": 0.01}
    assert tele["iterations"] == result["iterations"].tolist()
    assert tele["converged"] == [r <= 1e-2 for r in result["residual"].tolist()]
    assert tele["timings"]["total_ms"] >= tele["timings"]["inference_ms"] > 0
    fixed = backend.run(torch.from_numpy(images()), iters=3)
    assert fixed["iterations"].tolist() == [3, 3] and fixed.telemetry["converged"] is None


@pytest.mark.parametrize("strategy", ["loop", "unrolled"])
def test_ort_backend_matches_torch_backend(model, artifacts, strategy):
    ort_backend = load_backend(artifacts[strategy], threads=1)
    assert isinstance(ort_backend, OrtBackend) and ort_backend.strategy == strategy
    assert ort_backend.providers == ["CPUExecutionProvider"]
    x = images(4, (20, 24), seed=1) * CONTRASTS
    budget = {"iters": 3} if strategy == "unrolled" else {"max_iters": 40, "tol": 1e-2}
    ref = TorchBackend(model).run(x, **budget)
    got = ort_backend.run(x)  # the artifact's defaults are the same budget
    assert got.telemetry["budget"] == budget and got.telemetry["threads"] == 1
    assert got["iterations"].tolist() == ref["iterations"].tolist()
    np.testing.assert_allclose(got["logits"], ref["logits"], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(got["residual"], ref["residual"], rtol=1e-3)


def test_loop_artifact_takes_a_budget_per_call(artifacts):
    backend = OrtBackend(artifacts["loop"], threads=1)
    x = images(3)
    assert backend.run(x, max_iters=2)["iterations"].tolist() == [2, 2, 2]
    assert backend.run(x, max_iters=5, tol=0.0).telemetry["budget"] == {"max_iters": 5, "tol": 0.0}
    assert backend.run(x, tol=0.0)["iterations"].tolist() == [40, 40, 40]  # max_iters from the artifact
    with pytest.raises(InputError, match="loop strategy.*not iters"):
        backend.run(x, iters=5)
    with pytest.raises(InputError, match="tol must be a finite number >= 0"):
        backend.run(x, tol=-1.0)
    with pytest.raises(InputError, match="max_iters=0 is outside"):
        backend.run(x, max_iters=0)


def test_unrolled_artifact_refuses_other_budgets(artifacts):
    backend = OrtBackend(artifacts["unrolled"], threads=1)
    x = images(1)
    assert backend.run(x, iters=3)["iterations"].tolist() == [3]
    with pytest.raises(InputError, match="unrolled strategy \\(3 fixed steps\\)"):
        backend.run(x, max_iters=10, tol=1e-3)
    with pytest.raises(InputError, match="unrolled for exactly 3 steps, got iters=5"):
        backend.run(x, iters=5)
    with pytest.raises(InputError, match="iters=0 is outside"):
        backend.run(x, iters=0)


@pytest.mark.parametrize(
    "bad,match",
    [
        ((np.ones((1, 1, 8, 8)) * 255).astype(np.uint8), "floating point"),
        (np.ones((1, 1, 8, 8), dtype=np.float32) * 255, "must be in \\[0, 1\\]"),
        (np.ones((1, 3, 8, 8), dtype=np.float32), "N x 1 x H x W"),
        (np.ones((1, 8, 8), dtype=np.float32), "N x 1 x H x W"),
        (np.ones((0, 1, 8, 8), dtype=np.float32), "must not be empty"),
        (np.full((1, 1, 8, 8), np.nan, dtype=np.float32), "NaN"),
        ([[0.5]], "numpy array or torch tensor"),
    ],
)
def test_bad_images_are_rejected_by_every_backend(model, artifacts, bad, match):
    for backend in (TorchBackend(model), OrtBackend(artifacts["loop"], threads=1)):
        with pytest.raises(InputError, match=match):
            backend.run(bad)


def test_stride_comes_from_the_artifact(tmp_path):
    model = tiny_model("hgru-panoptic")
    stride = model.stride
    art = export_onnx(model, tmp_path / "pan.onnx", max_iters=5, tol=1e-2, example_size=(8 * stride, 8 * stride))
    backend = OrtBackend(art.path, threads=1)
    assert backend.in_channels == 3 and backend.size_multiple == stride
    result = backend.run(images(1, (4 * stride, 6 * stride), channels=3))
    assert set(result.heads) == {"semantic", "center", "offset"}
    with pytest.raises(InputError, match=f"multiple of the model stride {stride}"):
        backend.run(images(1, (4 * stride + 1, 4 * stride), channels=3))


def test_load_backend_dispatch_and_errors(model, artifacts, tmp_path):
    assert isinstance(load_backend(model), TorchBackend)
    ckpt = checkpoint.save(model, tmp_path / "m.pt")
    from_ckpt = load_backend(ckpt)
    assert isinstance(from_ckpt, TorchBackend) and isinstance(from_ckpt, Backend)
    assert isinstance(load_backend(str(artifacts["loop"]), kind="ort", threads=1), OrtBackend)
    with pytest.raises(InputError, match=r"runs an engine \(.engine or .plan\)"):
        load_backend(artifacts["loop"], kind="tensorrt")
    with pytest.raises(InputError, match="unknown backend kind"):
        load_backend(artifacts["loop"], kind="coreml")
    with pytest.raises(InputError, match="runs on onnxruntime or openvino, not torch"):
        load_backend(artifacts["loop"], kind="torch")
    with pytest.raises(InputError, match="unknown artifact type"):
        load_backend(tmp_path / "m.bin")
    with pytest.raises(InputError, match="no such ONNX file"):
        load_backend(tmp_path / "missing.onnx")
    with pytest.raises(InputError, match="has no TensorrtExecutionProvider"):
        OrtBackend(artifacts["loop"], providers=["TensorrtExecutionProvider"])
    with pytest.raises(InputError, match="threads must be a positive integer"):
        OrtBackend(artifacts["loop"], threads=0)


def test_foreign_onnx_files_are_refused(tmp_path):
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["images"], ["out"])],
        "g",
        [onnx.helper.make_tensor_value_info("images", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, [1])],
    )
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)], ir_version=10), tmp_path / "x.onnx")
    with pytest.raises(CrbpError, match="not a crbp-deploy ONNX export"):
        OrtBackend(tmp_path / "x.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(CrbpError, match="onnxruntime cannot load it"):
        OrtBackend(tmp_path / "junk.onnx")
