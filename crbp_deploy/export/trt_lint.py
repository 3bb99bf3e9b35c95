"""TensorRT-compatibility lint of an ONNX graph, runnable without TensorRT or a GPU.

Why: building an engine needs a GPU; this lets CI on a CPU catch a graph TensorRT would reject.
Every node (through Loop bodies and model-local functions) is checked against
onnx-tensorrt's operator support table (`trt_support.json`: supported or not, documented types)
and, for the operators crbp-deploy's exporter emits, against the restrictions its importer
enforces (`RULES`). Other operators get the table check only; tests/test_tensorrt.py pins the
emitted set, so an exporter change that emits a new operator asks for its rule.

Sources (facts transcribed, no code copied):

- [table] onnx/onnx-tensorrt `docs/operators.md` (edition and date in `trt_support.json`); its
  Restrictions column is encoded in the rules below.
- [importer] onnx/onnx-tensorrt `onnxOpImporters.cpp`, `DEFINE_BUILTIN_OP_IMPORTER(Loop)` (TensorRT
  10.x): the trip count is cast to INT32; a constant trip count >= INT32_MAX is dropped ("use cond
  input as loop termination"); the condition (body output 0, via `convertToScalar`) drives a kWHILE
  trip limit; scan outputs need a trip count, and with a condition as well "may have the wrong shape".
- [inputs] onnx/onnx-tensorrt `ModelImporter.cpp`, `importInputs`: a graph input with an
  initializer is parsed as a constant.
- [loops] NVIDIA TensorRT developer guide, "Working with Loops": kCOUNT takes a 0D INT32 tensor,
  kWHILE a 0D Bool computed in the loop; dataflow leaves a loop only through ILoopOutputLayer.
- [int64] `operators.md` for TensorRT <= 9: INT64 is cast down to INT32, clamping to +-INT_MAX.

Severity: "error" -- TensorRT (per the sources) rejects the graph or silently changes its meaning;
"warning" -- outside the documented contract or not provable statically; "info" -- worth knowing.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import onnx
from onnx import AttributeProto, GraphProto, NodeProto, TensorProto, helper, numpy_helper

from ..errors import CrbpError, InputError

INT32_MAX = 2**31 - 1
TOPK_MAX_K = 3840  # [table] TopK: "`K` input must be less than 3840"


@dataclass(frozen=True)
class SupportTable:
    """[table] as data: per operator its documented types, None where it is marked unsupported."""

    source: str
    opsets: tuple[int, int]
    types: frozenset[str]  # what TensorRT handles at all; DOUBLE is cast down to FLOAT
    ops: dict[str, frozenset[str] | None]


@functools.cache
def support_table() -> SupportTable:
    """The shipped `trt_support.json`, read once per process."""
    data = json.loads(resources.files(__package__).joinpath("trt_support.json").read_text(encoding="utf-8"))
    ops: dict[str, frozenset[str] | None] = {op: frozenset(types) for op, types in data["supported"].items()}
    ops.update(dict.fromkeys(data["unsupported"]))
    return SupportTable(data["source"], tuple(data["opsets"]), frozenset(data["types"]), ops)


_TYPE_NAMES = {
    TensorProto.FLOAT: "FP32", TensorProto.FLOAT16: "FP16", TensorProto.BFLOAT16: "BF16",
    TensorProto.FLOAT8E4M3FN: "FP8", TensorProto.FLOAT4E2M1: "FP4", TensorProto.INT4: "INT4",
    TensorProto.INT8: "INT8", TensorProto.UINT8: "UINT8", TensorProto.INT32: "INT32",
    TensorProto.INT64: "INT64", TensorProto.BOOL: "BOOL", TensorProto.DOUBLE: "DOUBLE",
}
#: Input whose type the table's "Supported Types" column is about (default: input 0); ops whose
#: input 0 says nothing about it (shape readers, control flow, constants, Cast) are skipped.
_TYPED_INPUT = {"Where": 1}
_UNTYPED = {"Shape", "Size", "Loop", "If", "Scan", "Constant", "ConstantOfShape", "Cast"}
_RESIZE_COORD = {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"}
_RESIZE_NEAREST = {"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"}
#: Never a build-time constant, even with constant inputs.
_NOT_FOLDABLE = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Bernoulli",
                 "Multinomial", "Loop", "If", "Scan", "Shape", "Size"}


@dataclass(frozen=True)
class Finding:
    severity: str  # error | warning | info
    node: str  # node name, nested as "outer::inner"; "" for graph-level findings
    op_type: str
    message: str


@dataclass
class LintReport:
    """What the lint found; `ok` when nothing would stop TensorRT."""

    findings: list[Finding] = field(default_factory=list)
    nodes_checked: int = 0
    opset: int | None = None
    source: str = field(default_factory=lambda: support_table().source)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def add(self, severity: str, node: str, op_type: str, message: str) -> None:
        self.findings.append(Finding(severity, node, op_type, message))

    def summary(self) -> str:
        head = (f"TensorRT lint: {'ok' if self.ok else 'FAILED'} -- {len(self.errors)} error(s), "
                f"{len(self.warnings)} warning(s), {self.nodes_checked} node(s) checked against {self.source}")
        lines = [head]
        for f in self.findings:
            where = f"{f.node} ({f.op_type})" if f.node else (f.op_type or "graph")
            lines.append(f"  {f.severity}: {where}: {f.message}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "source": self.source, "opset": self.opset, "nodes_checked": self.nodes_checked,
                "findings": [asdict(f) for f in self.findings]}


# --- scopes: what a name means in a (sub)graph -----------------------------------------------


@dataclass
class _Type:
    elem: int | None  # TensorProto data type, None if unknown
    shape: tuple[int | str | None, ...] | None  # None: rank unknown; str: symbolic; None dim: unknown

    @property
    def static(self) -> bool:
        return self.shape is not None and all(isinstance(d, int) for d in self.shape)


def _type_of(vi: onnx.ValueInfoProto) -> _Type:
    tt = vi.type.tensor_type
    if not vi.type.HasField("tensor_type"):
        return _Type(None, None)
    elem = tt.elem_type or None
    if not tt.HasField("shape"):
        return _Type(elem, None)
    dims = []
    for d in tt.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param") and d.dim_param:
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return _Type(elem, tuple(dims))


class _Scope:
    """Names visible in one graph, falling back to the enclosing graph's."""

    def __init__(self, graph: GraphProto, parent: "_Scope | None", path: str):
        self.graph, self.parent, self.path = graph, parent, path
        self.inputs = {v.name for v in graph.input}
        self.initializers = {t.name: t for t in graph.initializer}
        self.producer: dict[str, NodeProto] = {o: n for n in graph.node for o in n.output if o}
        self.types: dict[str, _Type] = {}
        for t in graph.initializer:
            self.types[t.name] = _Type(t.data_type, tuple(int(d) for d in t.dims))
        for vi in [*graph.input, *graph.value_info, *graph.output]:
            known = self.types.get(vi.name)
            new = _type_of(vi)
            if known is None or (known.shape is None and new.shape is not None):
                self.types[vi.name] = new
        self._folded: dict[str, bool] = {}

    def owner(self, name: str) -> "_Scope | None":
        scope: _Scope | None = self
        while scope is not None:
            if name in scope.inputs or name in scope.initializers or name in scope.producer:
                return scope
            scope = scope.parent
        return None

    def type(self, name: str) -> _Type:
        scope: _Scope | None = self
        while scope is not None:
            if name in scope.types:
                return scope.types[name]
            scope = scope.parent
        return _Type(None, None)

    def weights(self, name: str) -> np.ndarray | None:
        """The value of `name` if onnx-tensorrt sees it as weights: an initializer (also one that is a
        graph input, [inputs]) or the output of a Constant node."""
        scope = self.owner(name)
        if scope is None:
            return None
        if name in scope.initializers:
            return numpy_helper.to_array(scope.initializers[name])
        node = scope.producer.get(name)
        if node is not None and node.op_type == "Constant":
            return _constant_value(node)
        return None

    def foldable(self, name: str) -> bool:
        """A build-time constant: weights, or computed only from build-time constants."""
        scope = self.owner(name)
        if scope is None:
            return False
        if name in scope._folded:
            return scope._folded[name]
        scope._folded[name] = False  # cycle guard
        if self.weights(name) is not None:
            result = True
        elif name in scope.inputs:
            result = False
        else:
            node = scope.producer[name]
            if node.op_type in ("Shape", "Size"):
                result = scope.type(node.input[0]).static
            elif node.op_type in _NOT_FOLDABLE:
                result = False
            else:
                result = all(scope.foldable(i) for i in node.input if i)
        scope._folded[name] = result
        return result


def _constant_value(node: NodeProto) -> np.ndarray | None:
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name in ("value_int", "value_float"):
            return np.array(helper.get_attribute_value(attr))
        if attr.name in ("value_ints", "value_floats"):
            return np.array(list(helper.get_attribute_value(attr)))
    return None


def _attrs(node: NodeProto) -> dict[str, Any]:
    out = {}
    for a in node.attribute:
        if a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS):
            continue
        value = helper.get_attribute_value(a)
        out[a.name] = value.decode() if isinstance(value, bytes) else value
    return out


def _subgraphs(node: NodeProto) -> Iterator[tuple[str, GraphProto]]:
    for a in node.attribute:
        if a.type == AttributeProto.GRAPH:
            yield a.name, a.g
        elif a.type == AttributeProto.GRAPHS:
            for i, g in enumerate(a.graphs):
                yield f"{a.name}[{i}]", g


def _type_name(elem: int | None) -> str | None:
    if elem is None:
        return None
    return _TYPE_NAMES.get(elem, TensorProto.DataType.Name(elem))


def _check_type(report: LintReport, name: str, op: str, elem: int | None, what: str) -> None:
    """Universal type support ([table] preamble)."""
    t = _type_name(elem)
    if t is None or t in support_table().types:
        return
    if t == "DOUBLE":
        report.add("warning", name, op, f"{what} is DOUBLE: TensorRT casts it down to FLOAT (clamped to +-FLT_MAX)")
    else:
        report.add("error", name, op, f"{what} has type {t}, which TensorRT does not support")


# --- the lint -----------------------------------------------------------------------------------


def lint_tensorrt(model: onnx.ModelProto | str | os.PathLike) -> LintReport:
    """Check an ONNX model (proto or path) against what onnx-tensorrt documents; see the module doc."""
    proto = _load(model)
    report = LintReport()
    try:
        proto = onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=True)
    except Exception as exc:  # inference is a help, not a requirement: fall back to declared types
        report.add("info", "", "", f"ONNX shape inference failed ({str(exc).splitlines()[0]}); "
                   "checks use the declared types only")
    opsets = {o.domain or "ai.onnx": o.version for o in proto.opset_import}
    report.opset = opsets.get("ai.onnx")
    lo, hi = support_table().opsets
    if report.opset is None:
        report.add("error", "", "", "the model imports no default-domain (ai.onnx) opset")
    elif not lo <= report.opset <= hi:
        report.add("error", "", "", f"opset {report.opset} is outside the range TensorRT supports ({lo}..{hi})")
    functions = {(f.domain, f.name): f for f in proto.functions}
    graph = proto.graph
    scope = _Scope(graph, None, "")
    for vi in [*graph.input, *graph.output]:
        _check_type(report, "", "", scope.type(vi.name).elem, f"graph input/output {vi.name!r}")
    for name in sorted(scope.inputs & set(scope.initializers)):
        value = scope.weights(name)
        shown = value.tolist() if value is not None and value.size <= 4 else "..."
        report.add("info", "", "", (
            f"graph input {name!r} has an initializer: onnx-tensorrt parses it as a constant ({shown}), so an "
            "engine built from this file takes no per-call value for it (build_engine(expose_budget=True) "
            "removes the initializers of max_iters/tol first)"))
    _check_int64_weights(proto, report)
    _walk(graph, scope, "", report, functions)
    return report


def _load(model) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return copy
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.is_file():
            raise InputError(f"{path}: no such ONNX file")
        try:
            return onnx.load(str(path))
        except Exception as exc:  # protobuf's DecodeError and friends
            raise CrbpError(f"{path}: not a readable ONNX model ({exc})") from None
    raise InputError(f"lint_tensorrt needs an onnx.ModelProto or a path, got {type(model).__name__}")


def _walk(graph: GraphProto, scope: _Scope, prefix: str, report: LintReport, functions) -> None:
    for index, node in enumerate(graph.node):
        name = prefix + (node.name or f"{node.op_type}_{index}")
        report.nodes_checked += 1
        domain = node.domain or "ai.onnx"
        if (node.domain, node.op_type) in functions:  # model-local function: onnx-tensorrt inlines it
            fn = functions[(node.domain, node.op_type)]
            fn_graph = helper.make_graph(list(fn.node), fn.name, [], [])
            _walk(fn_graph, _Scope(fn_graph, scope, name), name + "::", report, functions)
            continue
        if domain != "ai.onnx":
            report.add("error", name, node.op_type,
                       f"operator of domain {domain!r} is not in the ONNX operator set; TensorRT needs a plugin for it")
            continue
        table = support_table().ops
        if node.op_type not in table:
            report.add("error", name, node.op_type, "not in onnx-tensorrt's operator support matrix")
            continue
        types = table[node.op_type]
        if types is None:
            report.add("error", name, node.op_type, "marked unsupported (N) in onnx-tensorrt's support matrix")
            continue
        _check_node_types(node, name, scope, types, report)
        check = RULES.get(node.op_type)
        if check is not None:
            check(node, name, scope, report)
        for _, sub in _subgraphs(node):
            _walk(sub, _Scope(sub, scope, name), f"{name}::", report, functions)


def _check_node_types(node: NodeProto, name: str, scope: _Scope, types: frozenset[str], report: LintReport) -> None:
    if node.op_type in _UNTYPED:
        return
    idx = _TYPED_INPUT.get(node.op_type, 0)
    if idx >= len(node.input) or not node.input[idx]:
        return
    elem = scope.type(node.input[idx]).elem
    t = _type_name(elem)
    if t is None:
        return
    if t not in support_table().types and t != "DOUBLE":
        _check_type(report, name, node.op_type, elem, f"input {node.input[idx]!r}")
    elif t not in types:
        report.add("warning", name, node.op_type,
                   f"input type {t} is not among the documented types for {node.op_type} ({', '.join(sorted(types))})")


def _check_int64_weights(proto: onnx.ModelProto, report: LintReport) -> None:
    """INT64 constants outside the INT32 range ([int64]); the Slice starts/ends sentinels (+-INT64_MAX)
    are the documented clamp idiom and skipped; trip counts are judged by the Loop rule."""
    exempt: set[str] = set()
    consumers: dict[str, list[str]] = {}

    def visit(g: GraphProto) -> Iterator[tuple[str, str, np.ndarray]]:
        for t in g.initializer:
            if t.data_type == TensorProto.INT64:
                yield t.name, "", numpy_helper.to_array(t)
        for n in g.node:
            for i, inp in enumerate(n.input):
                consumers.setdefault(inp, []).append(n.op_type)
                if (n.op_type == "Slice" and i in (1, 2)) or (n.op_type == "Loop" and i == 0):
                    exempt.add(inp)
            if n.op_type == "Constant":
                value = _constant_value(n)
                if value is not None and value.dtype == np.int64:
                    yield n.output[0], n.name, value
            for _, sub in _subgraphs(n):
                yield from visit(sub)

    found = list(visit(proto.graph))
    for value_name, node_name, value in found:
        if value_name in exempt or value.size == 0:
            continue
        big = np.abs(value.astype(np.float64)) > INT32_MAX
        if big.any():
            used = ", ".join(sorted(set(consumers.get(value_name, [])))) or "nothing"
            report.add("warning", node_name, "Constant" if node_name else "", (
                f"INT64 constant {value_name!r} (used by {used}) holds {int(big.sum())} value(s) beyond INT32; "
                "TensorRT <= 9 clamps INT64 to +-INT32_MAX (TensorRT 10 keeps INT64)"))


# --- restrictions of the operators the exporter emits ([table] Restrictions column, [importer]) ---


def _rule_resize(node, name, scope, report):
    a = _attrs(node)
    mode = a.get("mode", "nearest")
    if mode not in ("nearest", "linear"):
        report.add("error", name, "Resize", f"mode {mode!r} is unsupported (supported: nearest, linear)")
    coord = a.get("coordinate_transformation_mode", "half_pixel")
    if coord not in _RESIZE_COORD:
        report.add("error", name, "Resize", f"coordinate_transformation_mode {coord!r} is unsupported "
                   f"(supported: {', '.join(sorted(_RESIZE_COORD))})")
    if mode == "nearest" and a.get("nearest_mode", "round_prefer_floor") not in _RESIZE_NEAREST:
        report.add("error", name, "Resize", f"nearest_mode {a.get('nearest_mode')!r} is unsupported")
    if a.get("keep_aspect_ratio_policy", "stretch") != "stretch":
        report.add("error", name, "Resize", "keep_aspect_ratio_policy must be 'stretch'")
    if a.get("antialias", 0):
        report.add("error", name, "Resize", "antialiasing is not supported")
    scales = node.input[2] if len(node.input) > 2 else ""
    if scales and not scope.foldable(scales) and "axes" in a:
        rank = scope.type(node.input[0]).shape
        if rank is None or list(a["axes"]) != list(range(len(rank))):
            report.add("error", name, "Resize", "with a tensor `scales` input, `axes` must be an iota vector of length rank(input)")


def _rule_maxpool(node, name, scope, report):
    a = _attrs(node)
    kernel = a.get("kernel_shape")
    if kernel is not None and len(kernel) not in (2, 3):
        report.add("error", name, "MaxPool", f"{len(kernel)}D pooling: only 2D or 3D pooling is supported")
    if any(d != 1 for d in a.get("dilations", [])):
        report.add("error", name, "MaxPool", "`dilations` must be empty or all ones")
    if len(node.output) > 1 and node.output[1]:
        report.add("error", name, "MaxPool", "the `Indices` output is unsupported")


def _rule_reduce(node, name, scope, report):
    if len(node.input) > 1 and node.input[1] and scope.weights(node.input[1]) is None:
        report.add("error", name, node.op_type, "`axes` must be an initializer")


def _rule_squeeze(node, name, scope, report):
    if len(node.input) > 1 and node.input[1]:
        if not scope.foldable(node.input[1]):
            report.add("error", name, node.op_type, "`axes` must be resolvable to a constant")
    elif node.op_type == "Squeeze" and not _attrs(node).get("axes"):
        if not scope.type(node.input[0]).static:
            report.add("warning", name, node.op_type,
                       "Squeeze without axes on an input whose shape is not static: which dims are 1 must be known at build time")


def _rule_topk(node, name, scope, report):
    if _attrs(node).get("sorted", 1) != 1:
        report.add("error", name, "TopK", "`sorted` must be 1")
    if len(node.input) < 2 or not node.input[1]:
        return
    k = scope.weights(node.input[1])
    if k is None:
        report.add("warning", name, "TopK", (
            "`K` is not an initializer: TensorRT <= 8 required one, and 10.x cannot check K < 3840 at build time"))
    elif int(np.max(k)) >= TOPK_MAX_K:
        report.add("error", name, "TopK", f"K={int(np.max(k))}: `K` must be less than {TOPK_MAX_K}")


def _rule_constant(node, name, scope, report):
    bad = [a.name for a in node.attribute if a.name in ("sparse_value", "value_string", "value_strings")]
    if bad:
        report.add("error", name, "Constant", f"attribute {bad[0]!r} is unsupported")
    value = _constant_value(node)
    if value is not None and value.dtype.kind in "OSU":
        report.add("error", name, "Constant", "string constants are unsupported")


def _rule_cast(node, name, scope, report):
    allowed = support_table().ops["Cast"]
    to = _attrs(node).get("to")
    if to is not None:
        t = _type_name(to)
        if t == "DOUBLE":
            report.add("warning", name, "Cast", "cast to DOUBLE: TensorRT computes it as FLOAT")
        elif t not in allowed:
            report.add("error", name, "Cast", f"cast to {t} is unsupported (documented: {', '.join(sorted(allowed))})")
    src = _type_name(scope.type(node.input[0]).elem) if node.input else None
    if src is not None and src not in allowed and src != "DOUBLE":
        report.add("error" if src not in support_table().types else "warning", name, "Cast",
                   f"cast from {src} is not among the documented types ({', '.join(sorted(allowed))})")


def _rule_scatternd(node, name, scope, report):
    if _attrs(node).get("reduction", "none") != "none":
        report.add("error", name, "ScatterND", "`reduction` other than 'none' is not supported")


def _rule_loop(node, name, scope, report):
    """[importer] + [loops] + [table] Loop row: the trip count, the condition, the carried values and
    the scan outputs each map onto one part of TensorRT's ILoop, checked in turn below."""
    body = dict(_subgraphs(node)).get("body")
    if body is None:
        report.add("error", name, "Loop", "Loop without a body")
        return
    bscope = _Scope(body, scope, name)
    trip = node.input[0] if node.input else ""
    cond = node.input[1] if len(node.input) > 1 else ""
    carried = list(node.input[2:])
    _loop_trip(trip, name, scope, report)
    if not trip and not cond:
        report.add("error", name, "Loop", "neither a trip count nor a condition: TensorRT needs a trip limit")
    if cond and body.output:
        _loop_condition(body.output[0].name, name, bscope, report)
    _loop_carried(carried, body, name, scope, bscope, report)
    scans = [o.name for o in body.output[1 + len(carried):]]
    if scans:
        _loop_scans(scans, trip, cond, name, scope, report)


def _loop_trip(trip, name, scope, report):
    """A 0D INT32 tensor in TensorRT; onnx-tensorrt casts it and drops constants >= INT32_MAX."""
    trip_value = scope.weights(trip) if trip else None
    if trip_value is not None:
        flat = np.asarray(trip_value).reshape(-1)
        if flat.size != 1:
            report.add("error", name, "Loop", f"trip count {trip!r} must be a scalar, got shape {list(np.shape(trip_value))}")
        elif int(flat[0]) > INT32_MAX:
            report.add("error", name, "Loop", (
                f"trip count {trip!r} = {int(flat[0])} is not INT32-representable: "
                "TensorRT's ILoop takes a 0D INT32 trip limit and onnx-tensorrt drops constant trip counts "
                ">= 2^31-1, so the cap would be ignored"))
        elif int(flat[0]) == INT32_MAX:
            report.add("warning", name, "Loop", (
                f"trip count {trip!r} = INT32_MAX: onnx-tensorrt treats it as 'no trip limit' (condition only)"))
    elif trip:
        t = scope.type(trip)
        report.add("info", name, "Loop", (
            f"trip count {trip!r} is a runtime value ({_type_name(t.elem) or 'unknown type'}): onnx-tensorrt casts "
            "it to INT32, so values beyond 2^31-1 must be rejected before they reach the engine"))


def _loop_condition(out, name, bscope, report):
    """Body output 0 feeds the kWHILE recurrence through convertToScalar: a scalar BOOL computed in the
    body from the loop's own state (a value from outside would make the while-limit constant)."""
    t = bscope.type(out)
    if t.elem is not None and t.elem != TensorProto.BOOL:
        report.add("error", name, "Loop", f"the body's condition {out!r} is {_type_name(t.elem)}, not BOOL")
    if t.shape is None:
        report.add("warning", name, "Loop", f"the body's condition {out!r} has no known shape; it must be a scalar")
    elif t.static and int(np.prod(t.shape)) != 1:
        report.add("error", name, "Loop", f"the body's condition {out!r} has shape {list(t.shape)}; it must be a scalar")
    elif not t.static and len(t.shape) > 0:
        report.add("warning", name, "Loop", f"the body's condition {out!r} has shape {list(t.shape)}; it must be a scalar")
    if not _depends_on_state(out, bscope):
        where = "taken from outside the loop" if out not in bscope.producer else "computed from constants only"
        report.add("warning", name, "Loop", (
            f"the body's condition {out!r} is {where}, not from the loop's state: the while-limit never "
            "changes, so the loop stops only on its trip count (or after one trip)"))


def _loop_carried(carried, body, name, scope, bscope, report):
    """IRecurrenceLayer needs one type and shape every iteration ([table] Loop row)."""
    for i, initial in enumerate(carried):
        if 2 + i >= len(body.input) or 1 + i >= len(body.output):
            report.add("error", name, "Loop", "the body's inputs/outputs do not match the Loop's carried values")
            break
        b_in, b_out = body.input[2 + i].name, body.output[1 + i].name
        _compare_carried(report, name, f"carried value #{i} ({b_in!r} -> {b_out!r})",
                         bscope.type(b_in), bscope.type(b_out), strict=False)
        if initial:
            _compare_carried(report, name, f"carried value #{i} (initial {initial!r} vs body input {b_in!r})",
                             scope.type(initial), bscope.type(b_in), strict=True)
        t = _type_name(bscope.type(b_in).elem)
        if t is not None and t not in support_table().ops["Loop"]:
            report.add("warning", name, "Loop", f"carried value #{i} is {t}, not among the documented Loop types")


def _loop_scans(scans, trip, cond, name, scope, report):
    """Scan outputs are as long as the trip count, which must be a build-time constant and the only limit."""
    if not trip:
        report.add("error", name, "Loop", f"scan output(s) {scans} without a trip count: TensorRT cannot infer their length")
    elif not scope.foldable(trip):
        report.add("error", name, "Loop", f"scan output(s) {scans} with a runtime trip count: scan output length cannot be dynamic")
    elif cond:
        report.add("error", name, "Loop", (
            f"scan output(s) {scans} in a loop that also has a condition: when it stops early the outputs "
            "keep the trip-count length with undefined rows (onnx-tensorrt: 'may have the wrong shape')"))
    else:
        report.add("info", name, "Loop", f"scan output(s) {scans} with a constant trip count and no condition: supported")


def _compare_carried(report, name, what, a: _Type, b: _Type, strict: bool) -> None:
    if a.elem is not None and b.elem is not None and a.elem != b.elem:
        report.add("error", name, "Loop", f"{what}: type changes from {_type_name(a.elem)} to {_type_name(b.elem)}")
    if a.shape is None or b.shape is None:
        if not strict:
            report.add("warning", name, "Loop", f"{what}: shape unknown, cannot prove it is the same every iteration")
        return
    if len(a.shape) != len(b.shape):
        report.add("error", name, "Loop", f"{what}: rank changes from {len(a.shape)} to {len(b.shape)}")
        return
    for x, y in zip(a.shape, b.shape):
        if isinstance(x, int) and isinstance(y, int) and x != y:
            report.add("error", name, "Loop", f"{what}: shape changes from {list(a.shape)} to {list(b.shape)}; "
                       "loop-carried tensors must keep one shape across iterations")
            return
    if not strict and any(x != y or x is None for x, y in zip(a.shape, b.shape)):
        report.add("warning", name, "Loop", f"{what}: shapes {list(a.shape)} and {list(b.shape)} cannot be proved equal")


def _depends_on_state(value: str, bscope: _Scope) -> bool:
    """Whether a body value is computed from the iteration number or a carried value (passing the
    incoming condition straight through does not count: it never changes)."""
    state = {v.name for i, v in enumerate(bscope.graph.input) if i != 1}
    seen: set[str] = set()
    stack = [value]
    while stack:
        v = stack.pop()
        if v in seen or not v:
            continue
        seen.add(v)
        if v in state:
            return True
        node = bscope.producer.get(v)
        if node is None:
            continue
        stack.extend(node.input)
        for _, sub in _subgraphs(node):  # values a nested subgraph reads from this body
            stack.extend(i for s in sub.node for i in s.input)
    return False


#: operator -> its restriction check, for the operators crbp-deploy emits (see the module doc).
RULES = {
    "Resize": _rule_resize,
    "MaxPool": _rule_maxpool,
    "ReduceL2": _rule_reduce,
    "ReduceMax": _rule_reduce,
    "ReduceMean": _rule_reduce,
    "Squeeze": _rule_squeeze,
    "Unsqueeze": _rule_squeeze,
    "TopK": _rule_topk,
    "Constant": _rule_constant,
    "Cast": _rule_cast,
    "ScatterND": _rule_scatternd,
    "Loop": _rule_loop,
}
