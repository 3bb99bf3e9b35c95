"""Halting policies: one decision per sample, identical in eager (compact and masked), in the exported
compacted and masked ONNX Loops on ONNX Runtime, and in the trace calibrate scores them on."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from crbp_deploy import checkpoint
from crbp_deploy.errors import InputError
from crbp_deploy.export import export_onnx
from crbp_deploy.export.verify import sample_images
from crbp_deploy.frontier import simulate, trace
from crbp_deploy.halting_fit import attach_head, fit_head
from crbp_deploy.models import create_model, get_entry
from crbp_deploy.models.solver import stop_reasons
from crbp_deploy.runtime import TorchBackend, load_backend
from crbp_deploy.sources import resolve_model

RULES = [
    {"policy": "estimate", "threshold": 0.05, "patience": 1},
    {"policy": "stable", "threshold": 0.0, "patience": 3},
    {"policy": "learned", "threshold": 0.5, "patience": 2},
]


@pytest.fixture(scope="module")
def model():
    """The bundled panoptic model with a halting head fitted on a small trace (its pixel counts stand in
    for quality: enough to give the head a real decision to make)."""
    m = resolve_model("crbp-panoptic")[0]
    x = torch.from_numpy(sample_images(6, 3, (32, 32), seed=7))

    def decode(heads, truth):  # "quality" = agreement of the semantic argmax with the last step's
        pred = heads["semantic"].argmax(1)
        return np.stack([(pred == truth).sum((1, 2)).numpy(), (pred != truth).sum((1, 2)).numpy(),
                         np.zeros(len(pred))], 1).astype(np.float64)

    with torch.no_grad():
        final = m(x, iters=30)["semantic"].argmax(1)
    t = trace(m, [(x, final)], decode, steps=30, task="pathfinder", metric="IoU")
    attach_head(m, fit_head(t, epochs=200))
    return m


@pytest.fixture(scope="module")
def images():
    return sample_images(5, 3, (32, 32), seed=3)


@pytest.fixture(scope="module")
def artifact(model, tmp_path_factory):
    """One export per (policy, execution), shared by the ONNX Runtime, OpenVINO and TensorRT-lint tests."""
    made = {}

    def get(rule: dict, execution: str):
        key = (rule["policy"], execution)
        if key not in made:
            folder = tmp_path_factory.mktemp(f"{rule['policy']}-{execution}")
            made[key] = export_onnx(model, folder / "m.onnx", execution=execution, example_size=(32, 32),
                                    max_iters=30, tol=1e-4, **rule)
        return made[key]

    return get


@pytest.mark.parametrize("rule", RULES, ids=[r["policy"] for r in RULES])
def test_every_policy_decides_the_same_in_eager_and_both_onnx_loops(model, images, rule, artifact):
    budget = {"max_iters": 30, "tol": 1e-4, **rule}
    ref = TorchBackend(model).run(images, **budget)
    counts = ref["iterations"].tolist()
    assert len(set(counts)) > 1 or rule["policy"] == "learned", counts  # the policy stops samples at different steps
    assert "policy" in ref.telemetry["stopped"]
    with torch.no_grad():
        masked = model(torch.from_numpy(images), execution="masked", **budget)
    assert masked["iterations"].tolist() == counts
    for execution in ("compact", "masked") if rule["policy"] == "learned" else ("compact",):  # masked: the TensorRT form
        art = artifact(rule, execution)
        assert art.meta.policy == rule["policy"] and art.meta.budget.kwargs() == budget
        ort = load_backend(art.path, "onnxruntime", threads=1)
        got = ort.run(images)
        assert got["iterations"].tolist() == counts, execution
        np.testing.assert_allclose(got["semantic"], ref["semantic"], atol=1e-4, rtol=1e-3)
        other = {**budget, "threshold": rule["threshold"] * 0.5 if rule["policy"] != "learned" else 0.9}
        assert ort.run(images, threshold=other["threshold"])["iterations"].tolist() == \
            TorchBackend(model).run(images, **other)["iterations"].tolist()  # the threshold is a graph input


def test_trace_simulation_equals_the_solver(model, images):
    """What calibrate scores (a simulation on the trace) is what the solver runs."""
    x = torch.from_numpy(images)
    t = trace(model, [(x, None)], lambda heads, truth: np.zeros((len(x), 3)), steps=30, task="pathfinder",
              metric="IoU")
    from crbp_deploy.frontier import policy_signal

    for rule in RULES:
        stops = simulate(t, tol=1e-4, cap=30, signal=policy_signal(t, rule["policy"], model.halting_head), **rule)
        with torch.no_grad():
            run = model(x, max_iters=30, tol=1e-4, **rule)
        assert stops.tolist() == run["iterations"].tolist(), rule
    assert simulate(t, tol=0.05, cap=30).tolist() == model(x, max_iters=30, tol=0.05)["iterations"].tolist()


def test_the_head_lives_in_the_checkpoint_and_the_card(model, images, tmp_path):
    path = checkpoint.save(model, tmp_path / "m.pt", meta=model.meta)
    loaded = checkpoint.load(path)
    assert loaded.meta["inference"]["halting_head"] == model.halting_head.spec()
    budget = {"max_iters": 30, "tol": 1e-4, **RULES[2]}
    with torch.no_grad():
        assert loaded(torch.from_numpy(images), **budget)["iterations"].tolist() == \
            model(torch.from_numpy(images), **budget)["iterations"].tolist()


def test_stop_reasons():
    budget = {"max_iters": 10, "tol": 0.01}
    assert stop_reasons([3, 10, 4, 2], [0.005, 0.5, 0.2, float("nan")], budget) == ["converged", "cap", "policy", "diverged"]
    assert stop_reasons([5], [0.3], {"iters": 5}) == ["fixed"]


def test_what_cannot_run_is_refused(tmp_path):
    plain = create_model("hgru-panoptic", get_entry("hgru-panoptic").tiny)
    x = torch.rand(1, 3, 16, 16)
    with pytest.raises(InputError, match="no halting head"):
        plain(x, max_iters=5, tol=1e-3, policy="learned", threshold=0.5)
    with pytest.raises(InputError, match="unknown halting policy 'soon'; valid: tol, estimate, stable, learned"):
        plain(x, max_iters=5, tol=1e-3, policy="soon", threshold=0.5)
    with pytest.raises(InputError, match="needs strategy=loop"):
        export_onnx(plain, tmp_path / "u.onnx", strategy="unrolled", iters=3, policy="estimate", threshold=0.1)
    with pytest.raises(InputError, match="not exported in fp16"):
        export_onnx(plain, tmp_path / "f.onnx", fp16=True, max_iters=5, tol=1e-3, policy="stable", threshold=0.0)
    with pytest.raises(InputError, match="no halting head"):
        export_onnx(plain, tmp_path / "l.onnx", max_iters=5, tol=1e-3, policy="learned", threshold=0.5)
    art = export_onnx(plain, tmp_path / "e.onnx", max_iters=5, tol=1e-3, policy="estimate", threshold=0.1,
                      example_size=(16, 16))
    ort = load_backend(art.path, "onnxruntime", threads=1)
    with pytest.raises(InputError, match="computes the estimate halting policy in its Loop"):
        ort.run(x.numpy(), policy="stable", threshold=0.0)


@pytest.mark.parametrize("rule", RULES, ids=[r["policy"] for r in RULES])
def test_openvino_runs_every_policy_with_the_same_iterations(model, images, rule, artifact):
    pytest.importorskip("openvino", reason="openvino is not installed: pip install 'crbp-deploy[openvino]'")
    budget = {"max_iters": 30, "tol": 1e-4, **rule}
    art = artifact(rule, "compact")
    ov = load_backend(art.path, "openvino", threads=1)
    ref = TorchBackend(model).run(images, **budget)
    got = ov.run(images)
    assert got["iterations"].tolist() == ref["iterations"].tolist()
    np.testing.assert_allclose(got["semantic"], ref["semantic"], atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("rule", RULES, ids=[r["policy"] for r in RULES])
def test_policy_loops_pass_the_tensorrt_lint(rule, artifact):
    """Every policy's ops are ones TensorRT documents (checked on the compacted body, which holds the same
    policy ops), and the masked body TensorRT runs passes for the shipped (learned) policy. Execution on
    TensorRT itself is not verified here (no GPU): see README."""
    import onnx

    from crbp_deploy.export.tensorrt import prepare_for_tensorrt
    from crbp_deploy.export.trt_lint import lint_tensorrt

    arts = [artifact(rule, "compact")] + ([artifact(rule, "masked")] if rule["policy"] == "learned" else [])
    for graph in [g for a in arts for g in (onnx.load(str(a.path)), prepare_for_tensorrt(onnx.load(str(a.path))))]:
        report = lint_tensorrt(graph)
        assert report.ok and not report.warnings, report.summary()


def test_the_service_serves_the_policy_and_says_why_each_image_stopped(artifact):
    """The engines' shared service (TorchServe handler, Ray replica): the artifact's policy is the default,
    a request may set its threshold / patience (field or X- header), and each answer says why it stopped."""
    import io
    import json

    from PIL import Image

    from crbp_deploy.serving.service import PanopticService, RawRequest

    budget = {"max_iters": 30, "tol": 1e-4, "policy": "learned", "threshold": 0.5, "patience": 2}
    art = artifact(RULES[2], "compact")
    service = PanopticService(art.path)
    assert service.describe()["default_budget"]["policy"] == budget["policy"]  # the card's budget, same policy
    buf = io.BytesIO()
    Image.fromarray((sample_images(1, 3, (32, 32), seed=5)[0].transpose(1, 2, 0) * 255).astype(np.uint8)).save(buf, "PNG")
    png = buf.getvalue()
    plain, strict, bad, fixed = service.handle([
        RawRequest({"body": png}, {"body": "image/png"}),
        RawRequest({"body": png}, {"body": "image/png"}, {"X-Threshold": "0.99", "X-Patience": "3"}),
        RawRequest({"body": png, "patience": "0"}, {"body": "image/png"}),
        RawRequest({"body": png, "tol": "0.5"}, {"body": "image/png"}),
    ])
    a, b = json.loads(plain.json()), json.loads(strict.json())
    assert a["stopped"] in ("policy", "converged", "cap") and a["budget"]["policy"] == "learned"
    assert b["budget"]["threshold"] == 0.99 and b["budget"]["patience"] == 3 and b["iterations"] >= a["iterations"]
    assert bad.status == 400 and "patience must be an integer in 1..100" in json.loads(bad.json())["message"]
    assert json.loads(fixed.json())["stopped"] == "converged"  # a loose tol ends it before the policy
