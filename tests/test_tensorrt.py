"""TensorRT: the compatibility lint (CPU, every exported graph), engine planning, and -- on a GPU
with TensorRT -- real engine builds compared with onnxruntime per sample."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto as T
from onnx import helper

from crbp_deploy.errors import CrbpError, InputError
from crbp_deploy.export import ArtifactMeta, export_onnx
from crbp_deploy.export.tensorrt import (
    build_engine,
    plan_engine,
    prepare_for_tensorrt,
    read_engine_sidecar,
    tensorrt_available,
)
from crbp_deploy.export.trt_lint import INT32_MAX, RULES, lint_tensorrt, support_table
from crbp_deploy.export.verify import sample_images
from crbp_deploy.models import list_models
from crbp_deploy.runtime import OrtBackend, load_backend

from conftest import tiny_model

STRATEGIES = {"loop": dict(strategy="loop", max_iters=12, tol=1e-2),
              "loop-substeps": dict(strategy="loop", max_iters=12, tol=1e-2, substeps=2),
              "unrolled": dict(strategy="unrolled", iters=3)}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """Exports on demand, each once per module: (model name, strategy) -> path."""
    root = tmp_path_factory.mktemp("trt")
    cache = {}

    def get(name: str, strategy: str):
        if (name, strategy) not in cache:
            torch.set_num_threads(1)
            m = tiny_model(name)
            cache[name, strategy] = export_onnx(m, root / f"{name}-{strategy}.onnx", example_size=(16, 16),
                                                **STRATEGIES[strategy]).path
        return cache[name, strategy]

    return get


def _messages(report, severity="error"):
    return [f.message for f in report.findings if f.severity == severity]


# --- the lint on every graph we export ----------------------------------------------------------


@pytest.mark.parametrize("strategy", ["loop", "unrolled"])
def test_lint_passes_on_every_registry_export(model_name, strategy, artifacts):
    path = artifacts(model_name, strategy)
    report = lint_tensorrt(path)
    assert report.ok, report.summary()
    assert not report.warnings, report.summary()
    top = len(onnx.load(str(path)).graph.node)
    if strategy == "loop":
        assert report.nodes_checked > top, "the Loop body must be linted too"
        assert any("'max_iters' has an initializer" in f.message for f in report.findings if f.severity == "info")
    else:
        assert report.nodes_checked == top


def test_lint_passes_on_substep_loop_and_prepared_graphs(artifacts):
    path = artifacts("hgru-pathfinder", "loop-substeps")
    for model in (onnx.load(str(path)), prepare_for_tensorrt(onnx.load(str(path)))):
        report = lint_tensorrt(model)
        assert report.ok and not report.warnings, report.summary()
    prepared = lint_tensorrt(prepare_for_tensorrt(onnx.load(str(path))))
    assert any("runtime value" in m for m in _messages(prepared, "info")), "trip count is computed from max_iters"


class _Grouping(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("thing_mask", torch.tensor([True, True, False, False]))

    def forward(self, semantic, center, offset):
        from crbp_deploy.panoptic import panoptic_labels

        return panoptic_labels(semantic, center, offset, self.thing_mask, top_k=8)


@pytest.fixture(scope="module")
def grouping_graph(tmp_path_factory):
    """The in-graph panoptic grouping (`export --postprocess`), exported on its own."""
    gen = torch.Generator().manual_seed(0)
    example = (torch.randn(2, 4, 24, 32, generator=gen), torch.randn(2, 1, 24, 32, generator=gen),
               torch.randn(2, 2, 24, 32, generator=gen))
    dims = {0: torch.export.Dim("batch", max=64), 2: torch.export.Dim("height", max=4096),
            3: torch.export.Dim("width", max=4096)}
    path = tmp_path_factory.mktemp("grouping") / "grouping.onnx"
    torch.onnx.export(_Grouping().eval(), example, str(path), dynamo=True, verbose=False,
                      input_names=["semantic", "center", "offset"], output_names=["labels", "center_scores"],
                      dynamic_shapes={"semantic": dims, "center": dims, "offset": dims})
    return path


def test_lint_passes_on_panoptic_grouping_graph(grouping_graph):
    report = lint_tensorrt(grouping_graph)
    assert report.ok and not report.warnings, report.summary()
    assert {"TopK", "MaxPool"} <= _op_types(onnx.load(str(grouping_graph)).graph)  # restricted ops really checked


def _op_types(graph) -> set[str]:
    """Every op type in `graph`, Loop / If bodies included."""
    ops = set()
    for node in graph.node:
        ops.add(node.op_type)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                ops |= _op_types(attr.g)
    return ops


#: What the exporter emits, measured over the registry's tiny models and the bundled checkpoints with
#: every strategy (unrolled; loop compact, masked, masked with sub-steps), fp16, static and dynamic
#: shapes, prepare_for_tensorrt, and the in-graph panoptic grouping. fp16 adds no op type of its own.
EMITTED = {
    "Abs", "Add", "And", "ArgMax", "ArgMin", "Cast", "Clip", "Concat", "Constant", "Conv", "Div", "Equal", "Exp",
    "Expand", "Gather", "GatherND", "Greater", "Identity", "InstanceNormalization", "IsInf", "IsNaN", "Less", "Log",
    "Loop", "MaxPool", "Mul", "Neg", "NonZero", "Not", "Pad", "Pow", "Range", "ReduceL2", "ReduceMax", "Relu",
    "Reshape", "Resize", "ScatterND", "Shape", "Sigmoid", "Squeeze", "Sub", "TopK", "Transpose", "Unsqueeze", "Where",
    "Softplus",  # ff-pathfinder (models/pathfinder.py); no restrictions in operators.md
    "ReduceMean", "Sqrt", "Reciprocal",  # hgru-public's per-sample norm, written out (models/public_hgru.py)
}


def test_support_table_covers_every_operator_the_exporter_emits(artifacts, grouping_graph):
    emitted = _op_types(onnx.load(str(grouping_graph)).graph)
    exports = [(name, strategy) for name in list_models() for strategy in ("loop", "unrolled")]
    for name, strategy in [*exports, ("hgru-pathfinder", "loop-substeps")]:
        graph = onnx.load(str(artifacts(name, strategy))).graph
        emitted |= _op_types(graph)
    table = support_table()
    assert support_table() is table, "the data file is read once"
    assert not [op for op in sorted(emitted) if table.ops.get(op) is None], "emitted but not supported by TensorRT"
    new = emitted - EMITTED
    assert not new, f"newly emitted {sorted(new)}: check their Restrictions in operators.md, add rules and EMITTED"
    assert set(RULES) <= EMITTED, f"rules for operators nothing emits: {sorted(set(RULES) - EMITTED)}"
    assert {"Loop", "Resize", "TopK", "MaxPool", "ScatterND", "Squeeze"} <= emitted


# --- the lint catches seeded violations -----------------------------------------------------------


def _vi(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def _loop_model(body_nodes, body_outputs, *, trip=5, cond=True, carried_shape=(2,), extra_outer=()):
    """outer: x0 [carried_shape] -> Loop(trip, cond, x0) -> outputs; body: (i, c_in, x_in) -> body_outputs."""
    body = helper.make_graph(
        body_nodes, "body",
        [_vi("i", T.INT64, []), _vi("c_in", T.BOOL, []), _vi("x_in", T.FLOAT, list(carried_shape))],
        body_outputs,
    )
    inits, nodes = [], list(extra_outer)
    trip_name = cond_name = ""
    if trip is not None:
        inits.append(helper.make_tensor("M", T.INT64, [], [trip]))
        trip_name = "M"
    if cond is not None:
        inits.append(helper.make_tensor("c0", T.BOOL, [], [cond]))
        cond_name = "c0"
    outs = [o.name + "_final" for o in body_outputs[1:]]
    nodes.append(helper.make_node("Loop", [trip_name, cond_name, "x0"], outs, name="loop", body=body))
    declared = []
    for name, body_out in zip(outs, body_outputs[1:]):
        declared.append(onnx.ValueInfoProto())
        declared[-1].CopyFrom(body_out)
        declared[-1].name = name
    graph = helper.make_graph(nodes, "g", [_vi("x0", T.FLOAT, list(carried_shape))], declared, initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


_STEP = [helper.make_node("Add", ["x_in", "one"], ["x_out"]),
         helper.make_node("ReduceMax", ["x_out"], ["peak"], keepdims=0),
         helper.make_node("Less", ["peak", "limit"], ["c_out"])]
_CONSTS = [helper.make_node("Constant", [], ["one"], value=helper.make_tensor("", T.FLOAT, [], [1.0])),
           helper.make_node("Constant", [], ["limit"], value=helper.make_tensor("", T.FLOAT, [], [4.0]))]
_OUTS = [_vi("c_out", T.BOOL, []), _vi("x_out", T.FLOAT, [2])]


def test_lint_accepts_a_well_formed_early_exit_loop():
    model = _loop_model(_CONSTS + _STEP, _OUTS)
    onnx.checker.check_model(model, full_check=True)
    report = lint_tensorrt(model)
    assert report.ok and not report.warnings, report.summary()


def test_lint_catches_scan_output():
    nodes = _CONSTS + _STEP + [helper.make_node("Identity", ["x_out"], ["scan"])]
    model = _loop_model(nodes, _OUTS + [_vi("scan", T.FLOAT, [2])])
    errors = _messages(lint_tensorrt(model))
    assert any("scan output" in m and "condition" in m for m in errors), errors
    no_trip = _messages(lint_tensorrt(_loop_model(nodes, _OUTS + [_vi("scan", T.FLOAT, [2])], trip=None)))
    assert any("without a trip count" in m for m in no_trip), no_trip
    # a constant trip count and no condition: the one documented-safe form
    counted = lint_tensorrt(_loop_model(nodes, _OUTS + [_vi("scan", T.FLOAT, [2])], cond=None))
    assert counted.ok, counted.summary()


def test_lint_catches_unsupported_ops():
    for op, inputs in (("Unique", ["x"]), ("Det", ["x"]), ("NotAnOnnxOp", ["x"])):
        graph = helper.make_graph([helper.make_node(op, inputs, ["y"], name="bad")], "g",
                                  [_vi("x", T.FLOAT, [3, 3])], [_vi("y", T.FLOAT, None)])
        report = lint_tensorrt(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
        assert [f.node for f in report.errors] == ["bad"], report.summary()
    assert support_table().ops["Unique"] is None and "FP32" in support_table().ops["Conv"]
    custom = helper.make_graph([helper.make_node("Foo", ["x"], ["y"], domain="com.example")], "g",
                               [_vi("x", T.FLOAT, [3])], [_vi("y", T.FLOAT, None)])
    report = lint_tensorrt(helper.make_model(custom, opset_imports=[helper.make_opsetid("", 18),
                                                                    helper.make_opsetid("com.example", 1)]))
    assert any("plugin" in m for m in _messages(report))


def test_lint_catches_trip_count_beyond_int32():
    report = lint_tensorrt(_loop_model(_CONSTS + _STEP, _OUTS, trip=INT32_MAX + 10))
    assert any("not INT32-representable" in m for m in _messages(report)), report.summary()
    edge = lint_tensorrt(_loop_model(_CONSTS + _STEP, _OUTS, trip=INT32_MAX))
    assert edge.ok and any("no trip limit" in m for m in _messages(edge, "warning"))
    forever = lint_tensorrt(_loop_model(_CONSTS + _STEP, _OUTS, trip=None, cond=None))
    assert any("neither a trip count nor a condition" in m for m in _messages(forever))


def test_lint_catches_trip_count_beyond_int32_in_a_real_export(artifacts):
    model = onnx.load(str(artifacts("hgru-pathfinder", "loop")))
    for t in model.graph.initializer:
        if t.name == "max_iters":
            t.CopyFrom(helper.make_tensor("max_iters", T.INT64, [], [2**40]))
    report = lint_tensorrt(model)
    assert any("'max_iters' = 1099511627776 is not INT32-representable" in m for m in _messages(report)), report.summary()


def test_lint_catches_carried_tensor_that_changes_shape():
    grow = [helper.make_node("Concat", ["x_in", "x_in"], ["x_out"], axis=0),
            helper.make_node("Identity", ["c_in"], ["c_out"])]
    report = lint_tensorrt(_loop_model(grow, [_vi("c_out", T.BOOL, []), _vi("x_out", T.FLOAT, None)]))
    assert any("shape changes from [2] to [4]" in m for m in _messages(report)), report.summary()
    assert any("does not depend on" in m or "not from the loop's state" in m for m in _messages(report, "warning"))
    retype = [helper.make_node("Cast", ["x_in"], ["x_out"], to=T.INT32), helper.make_node("Identity", ["c_in"], ["c_out"])]
    report = lint_tensorrt(_loop_model(retype, [_vi("c_out", T.BOOL, []), _vi("x_out", T.INT32, [2])]))
    assert any("type changes from FP32 to INT32" in m for m in _messages(report)), report.summary()


def test_lint_catches_bad_loop_condition():
    vector_cond = [helper.make_node("Add", ["x_in", "one"], ["x_out"]), helper.make_node("Less", ["x_out", "limit"], ["c_out"])]
    report = lint_tensorrt(_loop_model(_CONSTS + vector_cond, [_vi("c_out", T.BOOL, [2]), _vi("x_out", T.FLOAT, [2])]))
    assert any("must be a scalar" in m for m in _messages(report)), report.summary()
    float_cond = [helper.make_node("Add", ["x_in", "one"], ["x_out"]),
                  helper.make_node("ReduceMax", ["x_out"], ["c_out"], keepdims=0)]
    report = lint_tensorrt(_loop_model(_CONSTS + float_cond, [_vi("c_out", T.FLOAT, []), _vi("x_out", T.FLOAT, [2])]))
    assert any("not BOOL" in m for m in _messages(report)), report.summary()
    outside = [helper.make_node("Add", ["x_in", "one"], ["x_out"]), helper.make_node("Identity", ["flag"], ["c_out"])]
    flag = helper.make_node("Constant", [], ["flag"], value=helper.make_tensor("", T.BOOL, [], [True]))
    report = lint_tensorrt(_loop_model(_CONSTS[:1] + outside, [_vi("c_out", T.BOOL, []), _vi("x_out", T.FLOAT, [2])],
                                       extra_outer=[flag]))
    assert any("not from the loop's state" in m for m in _messages(report, "warning")), report.summary()


def test_lint_flags_int64_beyond_int32_and_bad_opsets():
    big = helper.make_tensor("big", T.INT64, [1], [2**40])
    ends = helper.make_tensor("ends", T.INT64, [1], [2**63 - 1])
    starts = helper.make_tensor("starts", T.INT64, [1], [0])
    nodes = [helper.make_node("Add", ["x", "big"], ["y"]), helper.make_node("Slice", ["x", "starts", "ends"], ["z"])]
    graph = helper.make_graph(nodes, "g", [_vi("x", T.INT64, [4])], [_vi("y", T.INT64, [4]), _vi("z", T.INT64, [4])],
                              initializer=[big, ends, starts])
    report = lint_tensorrt(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    warnings = _messages(report, "warning")
    assert report.ok and len(warnings) == 1 and "'big' (used by Add)" in warnings[0], report.summary()
    old = lint_tensorrt(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)]))
    assert any("opset 8 is outside" in m for m in _messages(old))


def _one(node, inputs, inits=(), out_elem=T.FLOAT):
    """A one-node model, linted."""
    graph = helper.make_graph([node], "g", inputs, [_vi(node.output[0], out_elem, None)], initializer=list(inits))
    return lint_tensorrt(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


def test_lint_checks_resize():
    one = _one
    x = _vi("x", T.FLOAT, [1, 1, 8, 8])
    sizes = helper.make_tensor("sizes", T.INT64, [4], [1, 1, 16, 16])
    cubic = one(helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], mode="cubic"), [x], [sizes])
    assert any("mode 'cubic'" in m for m in _messages(cubic))
    crop = one(helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], mode="linear",
                                coordinate_transformation_mode="tf_crop_and_resize"), [x], [sizes])
    assert any("tf_crop_and_resize" in m for m in _messages(crop))
    fine = one(helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], mode="linear",
                                coordinate_transformation_mode="half_pixel"), [x], [sizes])
    assert fine.ok and not fine.warnings, fine.summary()
    for bad, match in (({"antialias": 1}, "antialiasing"), ({"keep_aspect_ratio_policy": "not_larger"}, "stretch"),
                       ({"mode": "nearest", "nearest_mode": "bogus"}, "nearest_mode 'bogus'")):
        report = one(helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], **{"mode": "linear", **bad}), [x], [sizes])
        assert any(match in m for m in _messages(report)), report.summary()
    runtime_scales = one(helper.make_node("Resize", ["x", "", "s"], ["y"], mode="linear", axes=[2, 3]),
                         [x, _vi("s", T.FLOAT, [2])])
    assert any("iota" in m for m in _messages(runtime_scales)), runtime_scales.summary()


def test_lint_checks_topk_maxpool_and_reduce():
    one = _one
    x = _vi("x", T.FLOAT, [1, 1, 8, 8])
    flat = _vi("v", T.FLOAT, [1, 5000])
    big_k = one(helper.make_node("TopK", ["v", "k"], ["y", "idx"], axis=1), [flat], [helper.make_tensor("k", T.INT64, [1], [4000])])
    assert any("less than 3840" in m for m in _messages(big_k))
    runtime_k = one(helper.make_node("TopK", ["v", "k"], ["y", "idx"], axis=1), [flat, _vi("k", T.INT64, [1])])
    assert runtime_k.ok and any("`K` is not an initializer" in m for m in _messages(runtime_k, "warning"))
    for op in ("ReduceMax", "ReduceL2", "ReduceMean"):
        axes_in = one(helper.make_node(op, ["x", "axes"], ["y"]), [x, _vi("axes", T.INT64, [1])])
        assert any("`axes` must be an initializer" in m for m in _messages(axes_in)), op
    unsorted = one(helper.make_node("TopK", ["v", "k"], ["y", "idx"], axis=1, sorted=0), [flat],
                   [helper.make_tensor("k", T.INT64, [1], [8])])
    assert [f.message for f in unsorted.errors] == ["`sorted` must be 1"], unsorted.summary()
    pool_idx = one(helper.make_node("MaxPool", ["x"], ["y", "ind"], kernel_shape=[3, 3]), [x])
    assert any("Indices" in m for m in _messages(pool_idx))
    dilated = one(helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], dilations=[2, 2]), [x])
    assert any("`dilations`" in m for m in _messages(dilated)), dilated.summary()
    pool_1d = one(helper.make_node("MaxPool", ["v"], ["y"], kernel_shape=[3]), [_vi("v", T.FLOAT, [1, 1, 50])])
    assert any("1D pooling" in m for m in _messages(pool_1d)), pool_1d.summary()
    pool = one(helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]), [x])
    assert pool.ok and not pool.warnings, pool.summary()
    axes = helper.make_tensor("axes", T.INT64, [1], [1])
    reduce_ok = one(helper.make_node("ReduceL2", ["x", "axes"], ["y"]), [x], [axes])
    assert reduce_ok.ok and not reduce_ok.warnings, reduce_ok.summary()


def test_lint_checks_squeeze_scatternd_constant_and_cast():
    one = _one
    x = _vi("x", T.FLOAT, [1, 1, 8, 8])
    for op in ("Squeeze", "Unsqueeze"):
        runtime_axes = one(helper.make_node(op, ["x", "axes"], ["y"]), [x, _vi("axes", T.INT64, [1])])
        assert any("`axes` must be resolvable to a constant" in m for m in _messages(runtime_axes)), op
    computed = helper.make_graph(  # axes computed from a static shape fold at build time
        [helper.make_node("Shape", ["x"], ["s"], start=0, end=1), helper.make_node("Sub", ["s", "s"], ["axes"]),
         helper.make_node("Unsqueeze", ["x", "axes"], ["y"])],
        "g", [x], [_vi("y", T.FLOAT, None)])
    folded = lint_tensorrt(helper.make_model(computed, opset_imports=[helper.make_opsetid("", 18)]))
    assert folded.ok, folded.summary()
    no_axes = one(helper.make_node("Squeeze", ["d"], ["y"]), [_vi("d", T.FLOAT, ["n", 1])])
    assert any("Squeeze without axes" in m for m in _messages(no_axes, "warning")), no_axes.summary()
    static = one(helper.make_node("Squeeze", ["d"], ["y"]), [_vi("d", T.FLOAT, [3, 1])])
    assert static.ok and not static.warnings, static.summary()

    data, idx, upd = _vi("d", T.FLOAT, [4]), _vi("i", T.INT64, [2, 1]), _vi("u", T.FLOAT, [2])
    assert one(helper.make_node("ScatterND", ["d", "i", "u"], ["y"]), [data, idx, upd]).ok
    summed = one(helper.make_node("ScatterND", ["d", "i", "u"], ["y"], reduction="add"), [data, idx, upd])
    assert any("`reduction`" in m for m in _messages(summed)), summed.summary()

    text = one(helper.make_node("Constant", [], ["y"], value_string="hi"), [], out_elem=T.STRING)
    assert any("'value_string' is unsupported" in m for m in _messages(text)), text.summary()
    number = one(helper.make_node("Constant", [], ["y"], value_float=1.0), [])
    assert number.ok, number.summary()

    to_string = one(helper.make_node("Cast", ["x"], ["y"], to=T.STRING), [x], out_elem=T.STRING)
    assert any("cast to STRING is unsupported" in m for m in _messages(to_string)), to_string.summary()
    to_double = one(helper.make_node("Cast", ["x"], ["y"], to=T.DOUBLE), [x], out_elem=T.DOUBLE)
    assert any("computes it as FLOAT" in m for m in _messages(to_double, "warning")), to_double.summary()
    from_uint16 = one(helper.make_node("Cast", ["w"], ["y"], to=T.FLOAT), [_vi("w", T.UINT16, [2])])
    assert any("cast from UINT16" in m for m in _messages(from_uint16)), from_uint16.summary()
    to_half = one(helper.make_node("Cast", ["x"], ["y"], to=T.FLOAT16), [x], out_elem=T.FLOAT16)
    assert to_half.ok and not to_half.warnings, to_half.summary()


def test_lint_checks_types_against_the_table():
    one = _one
    ints = one(helper.make_node("Sigmoid", ["i"], ["y"]), [_vi("i", T.INT32, [3])], out_elem=T.INT32)
    assert any("input type INT32 is not among the documented types for Sigmoid" in m
               for m in _messages(ints, "warning")), ints.summary()
    unsigned = one(helper.make_node("Relu", ["i"], ["y"]), [_vi("i", T.UINT16, [3])], out_elem=T.UINT16)
    assert any("UINT16, which TensorRT does not support" in m for m in _messages(unsigned)), unsigned.summary()
    double = one(helper.make_node("Relu", ["i"], ["y"]), [_vi("i", T.DOUBLE, [3])], out_elem=T.DOUBLE)
    assert double.ok and any("casts it down to FLOAT" in m for m in _messages(double, "warning")), double.summary()
    where = one(helper.make_node("Where", ["c", "a", "a"], ["y"]), [_vi("c", T.BOOL, [3]), _vi("a", T.FLOAT, [3])])
    assert where.ok and not where.warnings, where.summary()  # typed by input 1, not the BOOL condition


def test_lint_walks_into_model_local_functions():
    fn = helper.make_function("local", "wrapped", ["a"], ["b"], [helper.make_node("Unique", ["a"], ["b"], name="inner")],
                              opset_imports=[helper.make_opsetid("", 18)])
    graph = helper.make_graph([helper.make_node("wrapped", ["x"], ["y"], domain="local", name="call")], "g",
                              [_vi("x", T.FLOAT, [3])], [_vi("y", T.FLOAT, None)])
    model = helper.make_model(graph, functions=[fn], opset_imports=[helper.make_opsetid("", 18),
                                                                      helper.make_opsetid("local", 1)])
    report = lint_tensorrt(model)
    assert [f.node for f in report.errors] == ["call::inner"], report.summary()


# --- planning an engine (no TensorRT needed) -----------------------------------------------------


def test_prepared_graph_takes_the_budget_per_call_and_matches_the_original(artifacts):
    for strategy in ("loop", "loop-substeps"):
        path = artifacts("hgru-pathfinder", strategy)
        original = onnx.load(str(path))
        prepared = prepare_for_tensorrt(original)
        onnx.checker.check_model(prepared, full_check=True)
        inputs = {i.name: i.type.tensor_type.elem_type for i in prepared.graph.input}
        assert inputs == {"images": T.FLOAT, "max_iters": T.INT32, "tol": T.FLOAT}
        assert not {"max_iters", "tol"} & {t.name for t in prepared.graph.initializer}
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.log_severity_level = 3
        a = ort.InferenceSession(original.SerializeToString(), options, providers=["CPUExecutionProvider"])
        b = ort.InferenceSession(prepared.SerializeToString(), options, providers=["CPUExecutionProvider"])
        images = sample_images(4, 1, (24, 32), seed=7)
        for max_iters, tol in ((12, 1e-2), (5, 0.0), (40, 3e-2)):
            ref = a.run(None, {"images": images, "max_iters": np.array(max_iters, np.int64), "tol": np.array(tol, np.float32)})
            got = b.run(None, {"images": images, "max_iters": np.array(max_iters, np.int32), "tol": np.array(tol, np.float32)})
            for r, g in zip(ref, got):
                assert np.array_equal(r, g), (strategy, max_iters, tol)
            iterations = ref[1]
            assert iterations.max() <= max_iters
        assert len(set(ref[1].tolist())) > 1, "samples should stop after different numbers of steps"
    unrolled = onnx.load(str(artifacts("hgru-pathfinder", "unrolled")))
    assert prepare_for_tensorrt(unrolled) == unrolled
    loop = onnx.load(str(artifacts("hgru-pathfinder", "loop")))
    assert prepare_for_tensorrt(loop, expose_budget=False) == loop


def test_plan_engine_profile_and_options(artifacts, tmp_path):
    path = artifacts("hgru-pathfinder", "loop")
    engine = tmp_path / "pf.engine"
    plan = plan_engine(path, engine, min_shape=(1, 1, 16, 16), opt_shape=(2, 1, 32, 32), max_shape=(4, 1, 64, 64))
    assert plan.budget_inputs and plan.meta.strategy == "loop" and plan.lint.ok
    assert plan.profile() == {"images": {"min": [1, 1, 16, 16], "opt": [2, 1, 32, 32], "max": [4, 1, 64, 64]},
                              "max_iters": {"min": 1, "opt": 12, "max": 10_000}}
    assert not engine.exists(), "planning writes nothing"
    baked = plan_engine(path, engine, min_shape=(1, 1, 16, 16), opt_shape=(1, 1, 16, 16), max_shape=(1, 1, 16, 16),
                        expose_budget=False)
    assert not baked.budget_inputs and baked.max_iters_profile is None
    unrolled = plan_engine(artifacts("hgru-pathfinder", "unrolled"), tmp_path / "u.plan",
                           min_shape=(1, 1, 16, 16), opt_shape=(1, 1, 16, 16), max_shape=(2, 1, 32, 32))
    assert not unrolled.budget_inputs and unrolled.meta.iters == 3

    shapes = dict(min_shape=(1, 1, 16, 16), opt_shape=(2, 1, 32, 32), max_shape=(4, 1, 64, 64))
    with pytest.raises(InputError, match="is dynamic .* give min_shape, opt_shape and max_shape"):
        plan_engine(path, engine)
    with pytest.raises(InputError, match="missing max_shape"):
        plan_engine(path, engine, min_shape=(1, 1, 16, 16), opt_shape=(1, 1, 16, 16))
    with pytest.raises(InputError, match="3 channels; the model takes 1"):
        plan_engine(path, engine, **{**shapes, "opt_shape": (2, 3, 32, 32)})
    with pytest.raises(InputError, match="min_shape <= opt_shape <= max_shape"):
        plan_engine(path, engine, **{**shapes, "min_shape": (8, 1, 16, 16)})
    with pytest.raises(InputError, match="4 positive integers"):
        plan_engine(path, engine, **{**shapes, "max_shape": (4, 1, 64)})
    with pytest.raises(InputError, match="must end in .engine or .plan"):
        plan_engine(path, tmp_path / "pf.trt", **shapes)
    with pytest.raises(InputError, match="workspace_mb"):
        plan_engine(path, engine, workspace_mb=0, **shapes)
    with pytest.raises(InputError, match="no such ONNX file"):
        plan_engine(tmp_path / "missing.onnx", engine, **shapes)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InputError, match="is not a directory"):
        plan_engine(path, blocker / "pf.engine", **shapes)


def test_plan_engine_checks_stride_and_refuses_incompatible_graphs(artifacts, tmp_path):
    path = artifacts("hgru-panoptic", "loop")
    stride = ArtifactMeta.from_props({p.key: p.value for p in onnx.load(str(path)).metadata_props}).size_multiple
    if stride > 1:
        with pytest.raises(InputError, match="multiples of the model stride"):
            plan_engine(path, tmp_path / "p.engine", min_shape=(1, 3, stride + 1, 16 * stride),
                        opt_shape=(1, 3, 16 * stride, 16 * stride), max_shape=(2, 3, 16 * stride, 16 * stride))
    model = onnx.load(str(artifacts("hgru-pathfinder", "loop")))
    for t in model.graph.initializer:
        if t.name == "max_iters":
            t.CopyFrom(helper.make_tensor("max_iters", T.INT64, [], [2**40]))
    bad = tmp_path / "bad.onnx"
    onnx.save(model, str(bad))
    with pytest.raises(CrbpError, match="not TensorRT-compatible") as info:
        plan_engine(bad, tmp_path / "bad.engine", min_shape=(1, 1, 16, 16), opt_shape=(1, 1, 16, 16),
                    max_shape=(1, 1, 16, 16), expose_budget=False)
    assert not info.value.report.ok
    plain = tmp_path / "plain.onnx"
    graph = helper.make_graph([helper.make_node("Relu", ["images"], ["y"])], "g",
                              [_vi("images", T.FLOAT, [1, 1, 4, 4])], [_vi("y", T.FLOAT, None)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(plain))
    with pytest.raises(CrbpError, match="not a crbp-deploy ONNX export"):
        plan_engine(plain, tmp_path / "plain.engine")


@pytest.mark.skipif(tensorrt_available(), reason="checks the errors of a machine without TensorRT/CUDA")
def test_asking_for_tensorrt_without_it_names_what_is_missing(artifacts, tmp_path):
    missing = "TensorRT is not installed|no CUDA device"
    with pytest.raises(CrbpError, match=missing):
        build_engine(artifacts("hgru-pathfinder", "unrolled"), tmp_path / "pf.engine")
    with pytest.raises(CrbpError, match=missing):
        load_backend(tmp_path / "pf.engine")
    with pytest.raises(CrbpError, match=missing):
        load_backend(tmp_path / "pf.plan", kind="trt")
    assert not (tmp_path / "pf.engine").exists()


def test_tensorrt_kind_needs_an_engine_file(artifacts, tmp_path):
    with pytest.raises(InputError, match=r"runs an engine \(.engine or .plan\); build one .*build_engine"):
        load_backend(artifacts("hgru-pathfinder", "unrolled"), kind="tensorrt")
    with pytest.raises(InputError, match="is a TensorRT engine; it runs on tensorrt"):
        load_backend(tmp_path / "pf.engine", kind="onnxruntime")


# --- on a GPU with TensorRT: real engines ---------------------------------------------------------

PROFILE = dict(min_shape=(1, 1, 16, 16), opt_shape=(2, 1, 32, 32), max_shape=(4, 1, 64, 64))


@pytest.fixture(scope="module")
def loop_engine(artifacts, tmp_path_factory):
    if not tensorrt_available():
        pytest.skip("needs TensorRT and a CUDA device")
    path = tmp_path_factory.mktemp("engines") / "pf-loop.engine"
    result = build_engine(artifacts("hgru-pathfinder", "loop"), path, **PROFILE)
    return result


def _compare(trt_backend, ort_backend, images, **budget):
    ref, got = ort_backend.run(images, **budget), trt_backend.run(images, **budget)
    assert got["iterations"].dtype == np.int64
    assert got["iterations"].tolist() == ref["iterations"].tolist(), budget  # per sample, exactly
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-3, atol=1e-3, err_msg=name)
    return ref, got


@pytest.mark.gpu
@pytest.mark.skipif(not tensorrt_available(), reason="needs TensorRT and a CUDA device")
@pytest.mark.parametrize("size,batch", [((16, 16), 1), ((32, 32), 3), ((48, 64), 4)])
def test_loop_engine_matches_onnxruntime_per_sample(loop_engine, artifacts, size, batch):
    trt_b = load_backend(loop_engine.path)
    assert type(trt_b).__name__ == "TrtBackend" and trt_b.budget_inputs
    ort_b = OrtBackend(artifacts("hgru-pathfinder", "loop"), providers=["CPUExecutionProvider"], threads=1)
    images = sample_images(batch, 1, size, seed=batch)
    seen = set()
    for budget in ({}, {"max_iters": 5, "tol": 0.0}, {"max_iters": 40, "tol": 3e-2}):
        ref, got = _compare(trt_b, ort_b, images, **budget)
        seen.update(ref["iterations"].tolist())
        assert got.telemetry["backend"] == "tensorrt" and got.telemetry["budget"] == ref.telemetry["budget"]
    assert len(seen) > 1


@pytest.mark.gpu
@pytest.mark.skipif(not tensorrt_available(), reason="needs TensorRT and a CUDA device")
def test_loop_engine_verifies_against_pytorch_and_records_it(loop_engine):
    from crbp_deploy.export import verify
    from crbp_deploy.runtime.trt_backend import TrtBackend

    sidecar = read_engine_sidecar(loop_engine.path)
    assert sidecar["budget_inputs"] and sidecar["tf32"] is False and sidecar["lint"]["ok"]
    assert {io["name"] for io in sidecar["io"]} >= {"images", "max_iters", "tol", "logits", "iterations", "residual"}
    report = verify(loop_engine.path, tiny_model("hgru-pathfinder"), backend=TrtBackend(loop_engine.path),
                    atol=1e-3, rtol=1e-2)
    assert report.passed and report.iterations_match
    assert json.loads(loop_engine.sidecar.read_text())["verification"]["passed"] is True


@pytest.mark.gpu
@pytest.mark.skipif(not tensorrt_available(), reason="needs TensorRT and a CUDA device")
def test_unrolled_and_fixed_budget_engines(artifacts, tmp_path):
    from crbp_deploy.runtime.trt_backend import TrtBackend

    unrolled = build_engine(artifacts("hgru-pathfinder", "unrolled"), tmp_path / "u.engine", **PROFILE)
    ort_u = OrtBackend(artifacts("hgru-pathfinder", "unrolled"), providers=["CPUExecutionProvider"], threads=1)
    _compare(TrtBackend(unrolled.path), ort_u, sample_images(3, 1, (32, 48), seed=1))
    with pytest.raises(InputError, match="unrolled for exactly 3 steps"):
        TrtBackend(unrolled.path).run(sample_images(1, 1, (16, 16), seed=1), iters=4)

    fixed = build_engine(artifacts("hgru-pathfinder", "loop"), tmp_path / "f.engine", expose_budget=False, **PROFILE)
    backend = TrtBackend(fixed.path)
    assert not backend.budget_inputs
    ort_l = OrtBackend(artifacts("hgru-pathfinder", "loop"), providers=["CPUExecutionProvider"], threads=1)
    _compare(backend, ort_l, sample_images(2, 1, (32, 32), seed=2))
    with pytest.raises(InputError, match="budget fixed"):
        backend.run(sample_images(1, 1, (16, 16), seed=1), max_iters=3)
    with pytest.raises(InputError, match="optimization profile"):
        backend.run(sample_images(5, 1, (16, 16), seed=1))


@pytest.mark.gpu
@pytest.mark.skipif(not tensorrt_available(), reason="needs TensorRT and a CUDA device")
def test_fp16_engine_runs_close_to_fp32(artifacts, tmp_path):
    from crbp_deploy.runtime.trt_backend import TrtBackend

    result = build_engine(artifacts("hgru-pathfinder", "loop"), tmp_path / "h.engine", fp16=True, **PROFILE)
    assert read_engine_sidecar(result.path)["fp16"] is True
    images = sample_images(3, 1, (32, 32), seed=3)
    got = TrtBackend(result.path).run(images, max_iters=12, tol=0.0)
    ref = OrtBackend(artifacts("hgru-pathfinder", "loop"), providers=["CPUExecutionProvider"], threads=1).run(
        images, max_iters=12, tol=0.0)
    # fp16 may reach an exact fixed point (residual 0) and stop early; counts need not match fp32
    assert all(1 <= i <= 12 for i in got["iterations"].tolist())
    assert np.isfinite(got["logits"]).all()
    scale = float(np.abs(ref["logits"]).max())
    assert float(np.abs(got["logits"] - ref["logits"]).max()) <= 0.05 * scale + 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not tensorrt_available(), reason="needs TensorRT and a CUDA device")
def test_engine_and_sidecar_must_agree(loop_engine, tmp_path):
    from crbp_deploy.runtime.trt_backend import TrtBackend

    copy = tmp_path / "copy.engine"
    copy.write_bytes(loop_engine.path.read_bytes() + b"\0")
    (tmp_path / "copy.engine.json").write_text(loop_engine.sidecar.read_text())
    with pytest.raises(CrbpError, match="does not match its sidecar"):
        TrtBackend(copy)
    lone = tmp_path / "lone.engine"
    lone.write_bytes(loop_engine.path.read_bytes())
    with pytest.raises(CrbpError, match="no sidecar"):
        TrtBackend(lone)
