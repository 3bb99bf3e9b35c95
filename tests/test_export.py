import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from crbp_deploy.errors import CrbpError, InputError
from crbp_deploy.export import export_onnx, read_sidecar, sidecar_path, verify
from crbp_deploy.export import onnx_export
from crbp_deploy.models import list_models

from conftest import tiny_model

CONTRASTS = torch.tensor([0.05, 0.3, 0.7, 1.0]).view(4, 1, 1, 1)


def session(path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run(sess, images, **feeds):
    names = [o.name for o in sess.get_outputs()]
    extra = {k: np.array(v, dtype=np.int64 if k == "max_iters" else np.float32) for k, v in feeds.items()}
    return dict(zip(names, sess.run(names, {"images": images.numpy(), **extra})))


@pytest.fixture(scope="module")
def model():
    return tiny_model("hgru-pathfinder")


@pytest.fixture(scope="module")
def loop_art(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("loop") / "pf.onnx"
    return export_onnx(model, path, strategy="loop", max_iters=60, tol=1e-2, example_size=(16, 16))


@pytest.fixture(scope="module")
def unrolled_art(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("unrolled") / "pf.onnx"
    return export_onnx(model, path, strategy="unrolled", iters=4, example_size=(16, 16))


def test_loop_graph_is_valid_and_self_describing(loop_art):
    proto = onnx.load(str(loop_art.path))
    onnx.checker.check_model(proto, full_check=True)
    assert [n.op_type for n in proto.graph.node].count("Loop") == 1
    inits = {t.name for t in proto.graph.initializer}
    assert [i.name for i in proto.graph.input] == ["images", "max_iters", "tol"]
    assert {"max_iters", "tol"} <= inits, "budget inputs need initializers holding their defaults"
    assert [o.name for o in proto.graph.output] == ["logits", "iterations", "residual"]
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["crbp_deploy.strategy"]) == "loop"

    card = read_sidecar(loop_art.path)
    assert sidecar_path(loop_art.path).name == "pf.onnx.json"
    assert card["strategy"] == "loop" and card["defaults"] == {"max_iters": 60, "tol": 0.01}
    assert card["model"]["architecture"] == "hgru-pathfinder"
    assert card["inputs"][0]["shape"] == ["batch", 1, "height", "width"]
    outs = {o["name"]: o for o in card["outputs"]}
    assert outs["logits"]["shape"] == ["batch", 2, "height", "width"]
    assert outs["iterations"]["dtype"] == "int64" and outs["iterations"]["shape"] == ["batch"]
    assert card["opset"] == onnx_export.DEFAULT_OPSET and card["verification"] is None
    import hashlib

    assert card["sha256"] == hashlib.sha256(loop_art.path.read_bytes()).hexdigest()


@torch.no_grad()
def test_loop_matches_torch_per_sample(model, loop_art):
    x = torch.rand(4, 1, 24, 32, generator=torch.Generator().manual_seed(3)) * CONTRASTS  # not the traced size
    ref = model(x, max_iters=60, tol=1e-2)
    got = run(session(loop_art.path), x)
    assert got["iterations"].tolist() == ref["iterations"].tolist()
    assert len(set(got["iterations"].tolist())) > 1, "contrasts should need different budgets"
    np.testing.assert_allclose(got["logits"], ref["logits"].numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(got["residual"], ref["residual"].numpy(), rtol=1e-3)


@torch.no_grad()
def test_loop_budget_is_a_runtime_input(model, loop_art):
    sess = session(loop_art.path)
    x = torch.rand(3, 1, 16, 20, generator=torch.Generator().manual_seed(4)) * CONTRASTS[1:]
    assert run(sess, x, max_iters=2)["iterations"].tolist() == [2, 2, 2]
    # step 1 starts from h0 = 0, so its residual is ||h1|| / 1e-12: any sane tol needs a second step
    assert run(sess, x, tol=1e30)["iterations"].tolist() == [1, 1, 1]
    assert run(sess, x, tol=10.0)["iterations"].tolist() == [2, 2, 2]
    fixed = run(sess, x, max_iters=7, tol=0.0)
    ref = model(x, iters=7)
    assert fixed["iterations"].tolist() == [7, 7, 7]
    np.testing.assert_allclose(fixed["logits"], ref["logits"].numpy(), atol=1e-4, rtol=1e-4)
    loose = run(sess, x, tol=0.05)["iterations"]
    assert (loose <= run(sess, x)["iterations"]).all()
    assert loose.tolist() == model(x, max_iters=60, tol=0.05)["iterations"].tolist()


@torch.no_grad()
@pytest.mark.parametrize("batch,size", [(1, (16, 16)), (3, (20, 28))])
def test_unrolled_matches_torch_dynamic_shapes(model, unrolled_art, batch, size):
    proto = onnx.load(str(unrolled_art.path))
    assert "Loop" not in {n.op_type for n in proto.graph.node}
    onnx.checker.check_model(proto, full_check=True)
    x = torch.rand(batch, 1, *size, generator=torch.Generator().manual_seed(batch))
    ref = model(x, iters=4)
    got = run(session(unrolled_art.path), x)
    assert got["iterations"].tolist() == [4] * batch
    np.testing.assert_allclose(got["logits"], ref["logits"].numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(got["residual"], ref["residual"].numpy(), rtol=1e-3)


@torch.no_grad()
def test_substeps_keep_iteration_counts_exact(model, tmp_path):
    art = export_onnx(model, tmp_path / "k3.onnx", max_iters=60, tol=1e-2, substeps=3, example_size=(16, 16))
    sess = session(art.path)
    x = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(5)) * CONTRASTS
    for max_iters, tol in ((60, 1e-2), (7, 1e-2), (5, 0.0), (1, 0.0)):
        ref = model(x, max_iters=max_iters, tol=tol)
        got = run(sess, x, max_iters=max_iters, tol=tol)
        assert got["iterations"].tolist() == ref["iterations"].tolist(), (max_iters, tol)
        np.testing.assert_allclose(got["logits"], ref["logits"].numpy(), atol=1e-4, rtol=1e-4)


def test_static_export_fixes_the_shape(model, tmp_path):
    from crbp_deploy.runtime import OrtBackend

    art = export_onnx(model, tmp_path / "s.onnx", strategy="unrolled", iters=2, dynamic=False, batch=2,
                      example_size=(16, 24))
    assert read_sidecar(art.path)["inputs"][0]["shape"] == [2, 1, 16, 24]
    report = verify(art.path, model)  # defaults to the artifact's own shape
    assert report.passed and [(c["batch"], c["size"]) for c in report.cases] == [(2, [16, 24])]
    with pytest.raises(InputError, match="exported for images of shape \\[2, 1, 16, 24\\]"):
        OrtBackend(art.path).run(np.zeros((1, 1, 16, 24), dtype=np.float32))


@pytest.mark.parametrize(
    "options,match",
    [
        ({"strategy": "unrolled", "iters": 0}, "iters=0 is outside"),
        ({"strategy": "loop", "max_iters": 10, "tol": -1.0}, "tol must be a finite number >= 0"),
        ({"strategy": "loop", "iters": 5}, "loop strategy exits early"),
        ({"strategy": "unrolled"}, "needs iters=N"),
        ({"strategy": "unrolled", "iters": 3, "tol": 0.1}, "fixed count"),
        ({"strategy": "while"}, "strategy must be one of"),
        ({"opset": 9}, "opset must be"),
        ({"substeps": 0}, "substeps must be"),
        ({"example_size": (16,)}, "example_size"),
    ],
)
def test_bad_options_raise_and_write_nothing(model, tmp_path, options, match):
    with pytest.raises(InputError, match=match):
        export_onnx(model, tmp_path / "m.onnx", **options)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_destination_is_a_clear_error(model, tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the output folder should be")
    with pytest.raises(InputError, match="cannot write"):
        export_onnx(model, blocker / "m.onnx", strategy="unrolled", iters=1, example_size=(8, 8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not_a_dir"]
    with pytest.raises(InputError, match="must end in .onnx"):
        export_onnx(model, tmp_path / "m.bin", strategy="unrolled", iters=1)


def test_failed_export_leaves_no_file(model, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("simulated failure")

    monkeypatch.setattr(onnx_export, "compose_loop", broken)
    with pytest.raises(CrbpError, match="composing the ONNX Loop failed: simulated failure"):
        export_onnx(model, tmp_path / "m.onnx", example_size=(8, 8))
    assert list(tmp_path.iterdir()) == []


def test_export_records_its_precision(loop_art):
    """fp32 unless exported with fp16=True (tests/test_fp16_export.py); older artifacts read as fp32."""
    props = {p.key: p.value for p in onnx.load(str(loop_art.path)).metadata_props}
    assert json.loads(props["crbp_deploy.precision"]) == "fp32" and loop_art.meta.precision == "fp32"
    assert read_sidecar(loop_art.path)["precision"] == "fp32"
    del props["crbp_deploy.precision"]
    assert onnx_export.ArtifactMeta.from_props(props).precision == "fp32"


def test_verify_passes_and_records_in_sidecar(model, loop_art):
    report = verify(loop_art.path, model, sizes=[(16, 16), (24, 20)], batches=[1, 3])
    assert report.passed and report.iterations_match
    assert report.worst["logits"]["max_abs"] < 1e-4
    assert len(report.cases) == 4
    card = read_sidecar(loop_art.path)
    assert card["verification"]["passed"] is True
    assert card["verification"]["worst"]["iterations"]["max_abs"] == 0
    json.dumps(report.to_dict())


def test_verify_hook_and_mismatch_raise_with_numbers(model, unrolled_art):
    calls = []

    def parity(reference, candidate):
        calls.append((reference.name, candidate.name))
        return {"name": "pq", "passed": True, "pq_delta": 0.0}

    report = verify(unrolled_art.path, model, sizes=[(16, 16)], batches=[2], checks=[parity])
    assert calls == [("torch", "onnxruntime")] and report.checks[0]["pq_delta"] == 0.0

    other = tiny_model("hgru-pathfinder", seed=1)
    with pytest.raises(CrbpError, match=r"verify FAILED.*logits max abs") as info:
        verify(unrolled_art.path, other, sizes=[(16, 16)], batches=[2])
    assert not info.value.report.passed
    assert read_sidecar(unrolled_art.path)["verification"]["passed"] is False


@torch.no_grad()
@pytest.mark.parametrize("name", [n for n in list_models() if n != "hgru-pathfinder"])
def test_every_registered_model_exports_and_verifies(name, tmp_path):
    """The exporter knows nothing of Pathfinder: other heads, channels and strides work the same."""
    model = tiny_model(name)
    stride = int(getattr(model, "stride", 1))
    art = export_onnx(model, tmp_path / f"{name}.onnx", max_iters=20, tol=1e-2, example_size=(8 * stride, 8 * stride))
    card = read_sidecar(art.path)
    assert card["inputs"][0]["shape"][1] == model.in_channels
    assert card["inputs"][0]["size_multiple"] == stride
    report = verify(art.path, model, sizes=[(8 * stride, 12 * stride)], batches=[2])
    assert report.passed
    heads = set(model(torch.rand(1, model.in_channels, 4 * stride, 4 * stride), iters=1)) - {"iterations", "residual"}
    assert set(report.worst) == heads | {"iterations", "residual"}
