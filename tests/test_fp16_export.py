"""fp16 ONNX export (`export --fp16`, onnxconverter-common): the graph's types, ONNX Runtime parity with
PyTorch within the fp16 tolerances, the TensorRT lint, and the clear errors."""
import json
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, numpy_helper

from crbp_deploy import checkpoint
from crbp_deploy.errors import CrbpError, InputError
from crbp_deploy.export import export_onnx, read_sidecar, verify
from crbp_deploy.export.fp16 import execution_check, precision_of
from crbp_deploy.export.trt_lint import lint_tensorrt
from crbp_deploy.precision import TOLERANCES

from conftest import tiny_model

pytest.importorskip("onnxconverter_common", reason="fp16 export needs crbp-deploy[fp16]")

FLOAT, HALF, BOOL, INT64 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BOOL, TensorProto.INT64
KINDS = {
    "compact": {"strategy": "loop", "max_iters": 60, "tol": 1e-2, "execution": "compact"},
    "masked": {"strategy": "loop", "max_iters": 60, "tol": 1e-2, "execution": "masked"},
    "unrolled": {"strategy": "unrolled", "iters": 4},
}


@pytest.fixture(scope="module")
def model():
    return tiny_model("hgru-pathfinder")


@pytest.fixture(scope="module")
def arts(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fp16")
    return {k: export_onnx(model, folder / f"{k}.onnx", fp16=True, example_size=(16, 16), **kw).path
            for k, kw in KINDS.items()}


def _types(proto):
    """name -> elem type over the graph and every subgraph, after ONNX shape inference."""
    inferred = onnx.shape_inference.infer_shapes(proto)
    types, graphs = {}, [inferred.graph]
    while graphs:
        g = graphs.pop()
        for v in [*g.input, *g.output, *g.value_info]:
            types[v.name] = v.type.tensor_type.elem_type
        types.update({t.name: t.data_type for t in g.initializer})
        graphs += [a.g for n in g.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH]
    return inferred, types


def _nodes(graph):
    for node in graph.node:
        yield node
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _nodes(a.g)


@pytest.mark.parametrize("kind", list(KINDS))
def test_fp16_graph_keeps_io_and_convergence_test_fp32(arts, kind):
    proto = onnx.load(str(arts[kind]))
    onnx.checker.check_model(proto, full_check=True)
    inferred, types = _types(proto)
    graph = inferred.graph
    assert {i.name: i.type.tensor_type.elem_type for i in graph.input}["images"] == FLOAT
    assert {o.name: o.type.tensor_type.elem_type for o in graph.output} == {
        "logits": FLOAT, "iterations": INT64, "residual": FLOAT}
    nodes = list(_nodes(graph))
    # the math is fp16: convolutions read fp16 activations and fp16 weights
    convs = [n for n in nodes if n.op_type == "Conv"]
    assert convs and all(types[n.input[0]] == HALF and types[n.input[1]] == HALF for n in convs)
    assert precision_of(proto) == "fp16"
    # the convergence test is fp32: the relative change (two norms, the floor, the Div) and its comparisons
    producer = {o: n for n in nodes for o in n.output}
    norms = [n for n in nodes if n.op_type == "ReduceL2"]
    divs = [n for n in nodes if n.op_type == "Div" and producer.get(n.input[0]) in norms]
    tests = [n for n in nodes if n.op_type in ("IsInf", "IsNaN", "Greater")]
    assert norms and divs and {"IsInf", "IsNaN"} <= {n.op_type for n in tests}
    if kind != "unrolled":
        assert any(n.op_type == "Greater" and "tol" in n.input for n in tests), "residual > tol reads the fp32 input"
    for n in [*norms, *divs, *tests]:
        floats = [types[i] for i in n.input if types.get(i) in (FLOAT, HALF)]
        assert floats and all(t == FLOAT for t in floats), (n.op_type, n.name)
    clips = [n for n in nodes if n.op_type == "Clip"]
    floors = {t.name: numpy_helper.to_array(t) for g in [graph, *[a.g for n in graph.node for a in n.attribute
              if a.type == onnx.AttributeProto.GRAPH]] for t in g.initializer}
    assert any(floors.get(c.input[1]) is not None and floors[c.input[1]].dtype == np.float32
               and float(floors[c.input[1]]) == pytest.approx(1e-12) for c in clips), "the 1e-12 floor stays fp32"
    if kind != "unrolled":
        inits = {t.name: t for t in graph.initializer}
        assert inits["tol"].data_type == FLOAT and inits["max_iters"].data_type == INT64
        assert {i.name: i.type.tensor_type.elem_type for i in graph.input}["tol"] == FLOAT
        loop = next(n for n in graph.node if n.op_type == "Loop")
        body = loop.attribute[0].g
        # trip, cond, h, active, iterations, residual, streak (the halting policy's count)
        assert [i.type.tensor_type.elem_type for i in body.input] == [INT64, BOOL, FLOAT, BOOL, INT64, FLOAT, INT64]
        assert [o.type.tensor_type.elem_type for o in body.output] == [BOOL, FLOAT, BOOL, INT64, FLOAT, INT64]
        assert types[loop.input[0]] == INT64 and types[loop.input[1]] == BOOL
    props = {p.key: json.loads(p.value) for p in proto.metadata_props}
    assert props["crbp_deploy.precision"] == "fp16"
    sidecar = read_sidecar(arts[kind])
    assert sidecar["precision"] == "fp16" and sidecar["fp16"] is True
    assert sidecar["fp16_conversion"]["converter"] == "onnxconverter-common 1.16.0"
    assert sidecar["fp16_conversion"]["keep_io_types"] is True


@pytest.mark.parametrize("kind", list(KINDS))
def test_fp16_runs_on_onnxruntime_cpu_and_matches_torch(model, arts, kind):
    report = verify(arts[kind], model, sizes=[(16, 16), (24, 20)], batches=[1, 3], checks=[execution_check(arts[kind])])
    limits = TOLERANCES["fp16"]
    assert report.passed and report.iterations_match and report.precision == "fp16"
    assert (report.atol, report.rtol) == (limits.atol, limits.rtol)  # verify's fp16 tolerances, not fp32's
    assert report.worst["logits"]["max_abs"] < limits.atol
    pairs = [(c["iterations"]["reference"], c["iterations"]["candidate"]) for c in report.cases]
    same = sum(r == c for ref, got in pairs for r, c in zip(ref, got))
    assert same >= 0.75 * sum(len(ref) for ref, _ in pairs), pairs  # measured: all identical
    if kind != "unrolled":
        assert len({i for ref, _ in pairs for i in ref}) > 1, "samples should need different budgets"
    info = next(c for c in report.checks if c["name"] == "fp16_execution")
    assert info["providers"] == ["CPUExecutionProvider"] and info["arithmetic_nodes"] > 0
    assert "fp16" in info["note"] and info["passed"]


def _panoptic_with_labels(tmp_path):
    from crbp_deploy.data.panoptic_synth import CATEGORIES
    from crbp_deploy.export.panoptic_graph import WithPanopticLabels

    meta = {"categories": sorted(CATEGORIES, key=lambda c: c["id"]), "evaluation": {"image_size": 32}}
    ckpt = checkpoint.save(tiny_model("hgru-panoptic"), tmp_path / "pan.pt", meta=meta)
    return WithPanopticLabels(checkpoint.load(ckpt))


@pytest.mark.parametrize("case", ["ff-panoptic", "hgru-panoptic+postprocess", "static"])
def test_other_models_static_shapes_and_in_graph_labels(case, tmp_path):
    """Graphs that broke the bare converter: an encoder output read inside the graph (ff-panoptic),
    the in-graph panoptic grouping (index work that stays fp32), constants folded into outputs (static)."""
    options = {"max_iters": 30, "tol": 1e-2, "example_size": (32, 32)}
    if case == "ff-panoptic":
        model = tiny_model("ff-panoptic")
    elif case == "static":
        model = tiny_model("hgru-pathfinder")
        options.update(dynamic=False, batch=2, example_size=(16, 16))
    else:
        model = _panoptic_with_labels(tmp_path)
    art = export_onnx(model, tmp_path / "m.onnx", fp16=True, **options)
    onnx.checker.check_model(onnx.load(str(art.path)), full_check=True)
    report = verify(art.path, model, sizes=[options["example_size"]], batches=[2], write=False)
    assert report.passed and report.precision == "fp16"
    if case.endswith("postprocess"):  # the label map passed too (at most 0.1% of its pixels may differ)
        assert report.cases[0]["outputs"]["panoptic"]["ok"] and "center_scores" in report.worst


def test_tol_is_an_fp32_runtime_input(model, arts):
    """The probe that failed before: an fp32 `tol` fed to the fp16 graph, two budgets, two sets of counts."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(arts["compact"]), options, providers=["CPUExecutionProvider"])
    x = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(5)) * torch.tensor([0.2, 0.6, 1.0]).view(3, 1, 1, 1)
    counts = {}
    for tol in (1e-2, 3e-3):
        it, res = session.run(["iterations", "residual"], {"images": x.numpy(), "tol": np.array(tol, np.float32),
                                                         "max_iters": np.array(60, np.int64)})
        with torch.no_grad():
            ref = model(x, max_iters=60, tol=tol)
        assert res.dtype == np.float32 and np.all((res <= tol) | (it == 60))
        slack = np.ceil(TOLERANCES["fp16"].iterations * ref["iterations"].numpy())
        assert np.all(np.abs(it - ref["iterations"].numpy()) <= slack), (tol, it, ref["iterations"])
        counts[tol] = it
    assert np.all(counts[3e-3] >= counts[1e-2]) and np.any(counts[3e-3] > counts[1e-2])


@pytest.mark.parametrize("kind", list(KINDS))
def test_tensorrt_lint_accepts_the_fp16_graph(arts, kind):
    report = lint_tensorrt(arts[kind])
    assert report.ok and not report.errors, report.summary()


def _hide_converter(monkeypatch):
    for name in ("onnxconverter_common", "onnxconverter_common.float16"):
        monkeypatch.setitem(sys.modules, name, None)  # `import` now raises ImportError


def test_missing_converter_is_one_clear_line(model, tmp_path, monkeypatch, run_cli, one_error_line):
    _hide_converter(monkeypatch)
    with pytest.raises(InputError, match=r"onnxconverter-common.*pip install 'crbp-deploy\[fp16\]'"):
        export_onnx(model, tmp_path / "m.onnx", fp16=True, example_size=(16, 16))
    assert list(tmp_path.iterdir()) == []
    code, out, err = run_cli("export", "crbp-panoptic", "--fp16", "--out", tmp_path / "x.onnx")
    one_error_line(code, err, "pip install 'crbp-deploy[fp16]'")
    assert "onnxconverter-common" in err and "Traceback" not in err and out == ""
    assert list(tmp_path.iterdir()) == []


def test_cli_export_fp16_verifies_and_says_what_a_cpu_cannot(model, tmp_path, run_cli, monkeypatch):
    ckpt = checkpoint.save(model, tmp_path / "pf.pt")
    out = tmp_path / "pf16.onnx"
    code, stdout, err = run_cli("export", ckpt, "--fp16", "--out", out, "--size", "16x16")
    assert code == 0, stdout + err
    assert "fp16 (onnxconverter-common 1.16.0)" in stdout and "stay fp32" in stdout
    assert "TensorRT lint: ok" in stdout
    assert "verify PASSED" in stdout and "onnxruntime fp16" in stdout
    assert "per-sample iterations identical in" in stdout
    assert "not verified here: fp16 execution on a GPU" in stdout
    sidecar = read_sidecar(out)
    assert sidecar["precision"] == "fp16"
    assert sidecar["verification"]["passed"] and sidecar["verification"]["precision"] == "fp16"

    # an onnxruntime without the fp16 kernels: the report says so, no crash
    import crbp_deploy.runtime as runtime

    def no_kernels(*args, **kwargs):
        raise CrbpError(f"{out}: onnxruntime cannot load it ([ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : "
                        "Could not find an implementation for Conv(11) node with name 'step/node_conv2d_2')")

    monkeypatch.setattr(runtime, "load_backend", no_kernels)
    code, stdout, err = run_cli("verify", out, "--against", ckpt)
    assert code == 0 and "Traceback" not in err, stdout + err
    assert "verify SKIPPED" in stdout and "no fp16 kernel" in stdout and "Conv(11)" in stdout
    skipped = read_sidecar(out)["verification"]
    assert skipped["skipped"] is True and skipped["passed"] is None and "NOT_IMPLEMENTED" in skipped["reason"]
