"""TensorRT-compatibility lint of an ONNX graph, runnable without TensorRT or a GPU.

Checks every node (recursively through Loop / If / Scan bodies and model-local functions) against
onnx-tensorrt's documented operator support matrix and the restrictions that its importer enforces,
so a graph that TensorRT would reject is caught in CI on a CPU-only machine.

Sources (facts transcribed, no code copied):

- [matrix] onnx/onnx-tensorrt `docs/operators.md`, the edition headed "TensorRT 10.15 supports
  operators in the inclusive range of opset 9 to opset 24" (main branch, read 2026-11). The table
  below is that page's Supported / Supported Types columns; its Restrictions column is encoded as checks.
- [importer] onnx/onnx-tensorrt `onnxOpImporters.cpp`, `DEFINE_BUILTIN_OP_IMPORTER(Loop)` (TensorRT
  10.x): the trip count is cast to INT32 (`castHelper(..., kINT32)`); a constant trip count
  >= INT32_MAX is dropped ("use cond input as loop termination"); the condition becomes an
  IRecurrenceLayer fed by body output 0 through `convertToScalar` and drives a kWHILE trip limit;
  scan outputs need a trip count, and with a condition as well "may have the wrong shape".
- [inputs] onnx/onnx-tensorrt `ModelImporter.cpp`, `importInputs`: "Initializers are not really
  network inputs, so they need to be excluded" -- a graph input with an initializer is a constant.
- [loops] NVIDIA TensorRT developer guide, "Working with Loops": kCOUNT takes a 0D INT32 tensor,
  kWHILE a 0D Bool computed in the loop (typically from an IRecurrenceLayer output); dataflow leaves
  a loop only through ILoopOutputLayer.
- [int64] the same `operators.md` for TensorRT <= 9 ("TensorRT will attempt to cast down INT64 to
  INT32 ... clamping values to +-INT_MAX"); TensorRT 10 lists INT64 as a supported type.

Severity: "error" -- TensorRT (per the sources) rejects the graph or silently changes its meaning;
"warning" -- outside the documented contract or not provable statically; "info" -- worth knowing.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import onnx
from onnx import AttributeProto, GraphProto, NodeProto, TensorProto, helper, numpy_helper

from ..errors import CrbpError, InputError

MATRIX_SOURCE = (
    "onnx/onnx-tensorrt docs/operators.md for TensorRT 10.15 (opset 9..24), main branch, read 2026-11"
)
OPSET_RANGE = (9, 24)
INT32_MAX = 2**31 - 1
TOPK_MAX_K = 3840  # [matrix] TopK: "`K` input must be less than 3840"

# --- the support matrix, as data ([matrix]) ------------------------------------------------------
# One row per operator: name, Y/N, the documented types. Rows are verbatim in content.
_FLOATS = "FP32 FP16 BF16"
_NUM = "FP32 FP16 BF16 INT32 INT64"
_ALL = "FP32 FP16 BF16 INT32 INT64 BOOL"
_MATRIX_ROWS = f"""
Abs Y {_NUM}
Acos Y {_FLOATS}
Acosh Y {_FLOATS}
Add Y {_NUM}
AffineGrid N
And Y BOOL
ArgMax Y {_NUM}
ArgMin Y {_NUM}
Asin Y {_FLOATS}
Asinh Y {_FLOATS}
Atan Y {_FLOATS}
Atanh Y {_FLOATS}
Attention Y {_FLOATS} INT8 FP8
AveragePool Y {_FLOATS}
BatchNormalization Y {_FLOATS}
Bernoulli N
BitShift N
BitwiseAnd N
BitwiseNot N
BitwiseOr N
BitwiseXor N
BlackmanWindow Y FP32 FP16
Cast Y {_NUM} UINT8 BOOL
CastLike Y {_NUM} UINT8 BOOL
Ceil Y {_FLOATS}
Col2Im N
Celu Y {_FLOATS}
CenterCropPad N
Clip Y {_FLOATS}
Compress N
Concat Y {_ALL}
ConcatFromSequence N
Constant Y {_FLOATS} FP8 FP4 INT4 INT32 INT64 BOOL
ConstantOfShape Y {_FLOATS} FP8 FP4 INT4 INT32 INT64 BOOL
Conv Y {_FLOATS}
ConvInteger N
ConvTranspose Y {_FLOATS}
Cos Y {_FLOATS}
Cosh Y {_FLOATS}
CumSum Y {_FLOATS}
DFT N
DeformConv Y FP32 FP16
DepthToSpace Y {_NUM}
DequantizeLinear Y INT8 FP8 FP4 INT4
Det N
Div Y {_NUM}
Dropout Y {_FLOATS}
DynamicQuantizeLinear N
Einsum Y {_FLOATS}
Elu Y {_FLOATS}
Equal Y {_NUM}
Erf Y {_FLOATS}
Exp Y {_FLOATS}
Expand Y {_ALL}
EyeLike Y {_ALL}
Flatten Y {_ALL}
Floor Y {_FLOATS}
Gather Y {_ALL}
GatherElements Y {_ALL}
GatherND Y {_ALL}
Gelu Y {_FLOATS} INT8 INT32 INT64
Gemm Y {_FLOATS}
GlobalAveragePool Y {_FLOATS}
GlobalLpPool Y {_FLOATS}
GlobalMaxPool Y {_FLOATS}
Greater Y {_NUM}
GreaterOrEqual Y {_NUM}
GridSample Y FP32 FP16
GroupNormalization Y {_FLOATS}
GRU Y {_FLOATS}
HammingWindow Y FP32 FP16
HannWindow Y FP32 FP16
HardSigmoid Y {_FLOATS}
HardSwish Y {_FLOATS}
Hardmax Y {_FLOATS}
Identity Y {_ALL}
If Y {_ALL}
ImageScaler Y {_FLOATS}
ImageDecoder N
InstanceNormalization Y {_FLOATS}
IsInf Y {_FLOATS}
IsNaN Y {_NUM}
LayerNormalization Y {_FLOATS}
LeakyRelu Y {_FLOATS}
Less Y {_NUM}
LessOrEqual Y {_NUM}
Log Y {_FLOATS}
LogSoftmax Y {_FLOATS}
Loop Y {_ALL}
LRN Y {_FLOATS}
LSTM Y {_FLOATS}
LpNormalization Y {_FLOATS}
LpPool Y {_FLOATS}
MatMul Y {_FLOATS}
MatMulInteger N
Max Y {_NUM}
MaxPool Y {_FLOATS}
MaxRoiPool N
MaxUnpool N
Mean Y {_FLOATS} FP8 INT32 INT64
MeanVarianceNormalization Y {_FLOATS}
MelWeightMatrix N
Min Y {_NUM}
Mish Y FP32 FP16
Mod Y {_NUM}
Mul Y {_NUM}
Multinomial N
Neg Y {_NUM}
NegativeLogLikelihoodLoss N
NonMaxSuppression Y FP32 FP16
NonZero Y FP32 FP16
Not Y BOOL
OneHot Y {_ALL}
Optional N
OptionalGetElement N
OptionalHasElement N
Or Y BOOL
Pad Y {_NUM}
ParametricSoftplus Y {_FLOATS}
Pow Y {_NUM}
PRelu Y {_FLOATS}
QLinearConv N
QLinearMatMul N
QuantizeLinear Y {_FLOATS}
RandomNormal Y {_FLOATS}
RandomNormalLike Y {_FLOATS}
RandomUniform Y {_FLOATS}
RandomUniformLike Y {_FLOATS}
Range Y {_NUM}
Reciprocal Y {_FLOATS}
ReduceL1 Y {_NUM}
ReduceL2 Y {_NUM}
ReduceLogSum Y {_NUM}
ReduceLogSumExp Y {_NUM}
ReduceMax Y {_NUM}
ReduceMean Y {_NUM}
ReduceMin Y {_NUM}
ReduceProd Y {_NUM}
ReduceSum Y {_NUM}
ReduceSumSquare Y {_NUM}
RegexFullMatch N
Relu Y {_NUM}
Reshape Y {_ALL}
Resize Y {_FLOATS}
ReverseSequence Y {_ALL}
RMSNormalization Y {_FLOATS}
RNN Y {_FLOATS}
RoiAlign Y FP32 FP16
RotaryEmbedding Y {_FLOATS}
Round Y {_FLOATS}
STFT Y FP32
ScaledTanh Y {_FLOATS}
Scan Y {_FLOATS}
Scatter Y {_NUM}
ScatterElements Y {_NUM}
ScatterND Y {_NUM}
Selu Y {_FLOATS}
SequenceAt N
SequenceConstruct N
SequenceEmpty N
SequenceErase N
SequenceInsert N
SequenceLength N
SequenceMap N
Shape Y {_ALL}
Shrink Y {_NUM}
Sigmoid Y {_FLOATS}
Sign Y {_NUM}
Sin Y {_FLOATS}
Sinh Y {_FLOATS}
Size Y {_ALL}
Slice Y {_ALL}
Softmax Y {_FLOATS}
SoftmaxCrossEntropyLoss N
Softplus Y {_FLOATS}
Softsign Y {_FLOATS}
SpaceToDepth Y {_NUM}
Split Y {_ALL}
SplitToSequence N
Sqrt Y {_FLOATS}
Squeeze Y {_ALL}
StringConcat N
StringNormalizer N
StringSplit N
Sub Y {_NUM}
Sum Y {_NUM}
Tan Y {_FLOATS}
Tanh Y {_FLOATS}
TensorScatter Y {_FLOATS} INT32
TfIdfVectorizer N
ThresholdedRelu Y {_FLOATS}
Tile Y {_ALL}
TopK Y {_NUM}
Transpose Y {_ALL}
Trilu Y {_ALL}
Unique N
Unsqueeze Y {_ALL}
Upsample Y {_FLOATS}
Where Y {_ALL}
Xor Y BOOL
"""


def _parse_matrix(text: str) -> dict[str, tuple[bool, frozenset[str]]]:
    rows = {}
    for line in text.strip().splitlines():
        name, supported, *types = line.split()
        rows[name] = (supported == "Y", frozenset(types))
    return rows


SUPPORT_MATRIX: dict[str, tuple[bool, frozenset[str]]] = _parse_matrix(_MATRIX_ROWS)

#: Types TensorRT 10 handles at all ([matrix] preamble); DOUBLE is cast down to FLOAT.
TRT_TYPES = frozenset({"FP32", "FP16", "BF16", "FP8", "FP4", "INT32", "INT64", "INT8", "INT4", "UINT8", "BOOL"})
_TYPE_NAMES = {
    TensorProto.FLOAT: "FP32", TensorProto.FLOAT16: "FP16", TensorProto.BFLOAT16: "BF16",
    TensorProto.FLOAT8E4M3FN: "FP8", TensorProto.FLOAT4E2M1: "FP4", TensorProto.INT4: "INT4",
    TensorProto.INT8: "INT8", TensorProto.UINT8: "UINT8", TensorProto.INT32: "INT32",
    TensorProto.INT64: "INT64", TensorProto.BOOL: "BOOL", TensorProto.DOUBLE: "DOUBLE",
}
#: Which input carries the type the matrix's "Supported Types" column is about (default: input 0).
_TYPED_INPUT = {"Where": 1}
_UNTYPED = {"Shape", "Size", "Loop", "If", "Scan", "Constant", "ConstantOfShape", "Cast", "CastLike",
            "DequantizeLinear", "QuantizeLinear"}  # Cast/Loop/constants are checked by their own rules
_REDUCE = {"ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
           "ReduceProd", "ReduceSum", "ReduceSumSquare"}
_RESIZE_COORD = {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"}
_RESIZE_MODES = {"nearest", "linear"}
_RESIZE_NEAREST = {"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"}
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
    source: str = MATRIX_SOURCE

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
    """Universal type support ([matrix] preamble)."""
    t = _type_name(elem)
    if t is None or t in TRT_TYPES:
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
    lo, hi = OPSET_RANGE
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
        row = SUPPORT_MATRIX.get(node.op_type)
        if row is None:
            report.add("error", name, node.op_type, "not in onnx-tensorrt's operator support matrix")
            continue
        supported, types = row
        if not supported:
            report.add("error", name, node.op_type, "marked unsupported (N) in onnx-tensorrt's support matrix")
            continue
        _check_node_types(node, name, scope, types, report)
        check = _RULES.get(node.op_type)
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
    if t not in TRT_TYPES and t != "DOUBLE":
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


# --- per-operator rules ([matrix] Restrictions column, [importer]) -----------------------------


def _rule_resize(node, name, scope, report):
    a = _attrs(node)
    mode = a.get("mode", "nearest")
    if mode not in _RESIZE_MODES:
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


def _rule_pool(node, name, scope, report):
    a = _attrs(node)
    kernel = a.get("kernel_shape")
    if kernel is not None and len(kernel) not in (2, 3):
        report.add("error", name, node.op_type, f"{len(kernel)}D pooling: only 2D or 3D pooling is supported")
    if any(d != 1 for d in a.get("dilations", [])):
        report.add("error", name, node.op_type, "`dilations` must be empty or all ones")
    if node.op_type == "MaxPool" and len(node.output) > 1 and node.output[1]:
        report.add("error", name, node.op_type, "the `Indices` output is unsupported")


def _rule_reduce(node, name, scope, report):
    if len(node.input) > 1 and node.input[1] and scope.weights(node.input[1]) is None:
        report.add("error", name, node.op_type, "`axes` must be an initializer")


def _rule_squeeze(node, name, scope, report):
    if len(node.input) > 1 and node.input[1]:
        if not scope.foldable(node.input[1]):
            report.add("error", name, node.op_type, "`axes` must be resolvable to a constant")
    elif node.op_type == "Squeeze" and not _attrs(node).get("axes"):
        t = scope.type(node.input[0])
        if not t.static:
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


def _rule_build_time_input(index: int, what: str):
    def rule(node, name, scope, report):
        if len(node.input) > index and node.input[index] and not scope.foldable(node.input[index]):
            report.add("error", name, node.op_type, f"`{what}` must be a build-time constant")
    return rule


def _rule_dropout(node, name, scope, report):
    if len(node.input) > 2 and node.input[2]:
        value = scope.weights(node.input[2])
        if value is None or bool(np.any(value)):
            report.add("error", name, "Dropout", "`training_mode` must be an initializer that evaluates to False")


def _rule_constant(node, name, scope, report):
    bad = [a.name for a in node.attribute if a.name in ("sparse_value", "value_string", "value_strings")]
    if bad:
        report.add("error", name, "Constant", f"attribute {bad[0]!r} is unsupported")
    value = _constant_value(node)
    if value is not None and value.dtype.kind in "OSU":
        report.add("error", name, "Constant", "string constants are unsupported")


def _rule_cast(node, name, scope, report):
    to = _attrs(node).get("to")
    allowed = SUPPORT_MATRIX[node.op_type][1]
    if to is not None:
        t = _type_name(to)
        if t == "DOUBLE":
            report.add("warning", name, node.op_type, "cast to DOUBLE: TensorRT computes it as FLOAT")
        elif t not in allowed:
            report.add("error", name, node.op_type, f"cast to {t} is unsupported (documented: {', '.join(sorted(allowed))})")
    src = _type_name(scope.type(node.input[0]).elem) if node.input else None
    if src is not None and src not in allowed and src != "DOUBLE":
        report.add("error" if src not in TRT_TYPES else "warning", name, node.op_type,
                   f"cast from {src} is not among the documented types ({', '.join(sorted(allowed))})")


def _rule_scatternd(node, name, scope, report):
    if _attrs(node).get("reduction", "none") != "none":
        report.add("error", name, "ScatterND", "`reduction` other than 'none' is not supported")


def _rule_layernorm(node, name, scope, report):
    if any(o for o in node.output[1:]):
        report.add("error", name, node.op_type, "only the first output `Y` is supported")


def _rule_lstm(node, name, scope, report):
    a = _attrs(node)
    if a.get("input_forget", 0) != 0 or a.get("layout", 0) != 0:
        report.add("error", name, "LSTM", "`input_forget` and `layout` must be 0")


def _rule_eyelike(node, name, scope, report):
    if not scope.type(node.input[0]).static:
        report.add("error", name, "EyeLike", "`input` must have static dimensions")


def _rule_zero_point(index: int, what: str):
    def rule(node, name, scope, report):
        if len(node.input) > index and node.input[index]:
            value = scope.weights(node.input[index])
            if value is None:
                report.add("warning", name, node.op_type, f"`{what}` is not an initializer; it must be zero")
            elif np.any(value != 0):
                report.add("error", name, node.op_type, f"`{what}` must be zero")
    return rule


def _rule_gridsample(node, name, scope, report):
    shape = scope.type(node.input[0]).shape
    if shape is not None and len(shape) != 4:
        report.add("error", name, "GridSample", f"input must be 4D, got rank {len(shape)}")


def _rule_if(node, name, scope, report):
    branches = dict(_subgraphs(node))
    then, other = branches.get("then_branch"), branches.get("else_branch")
    if then is None or other is None:
        return
    for a, b in zip(then.output, other.output):
        ra, rb = _type_of(a).shape, _type_of(b).shape
        if ra is not None and rb is not None and len(ra) != len(rb):
            report.add("error", name, "If", f"branch outputs {a.name!r} and {b.name!r} have different ranks ({len(ra)} vs {len(rb)})")
        if a.name == b.name:
            report.add("error", name, "If", f"both branches output the same name {a.name!r}; they must differ")


def _rule_loop(node, name, scope, report):
    """[importer] + [loops] + [matrix] Loop row. Interpreting "a condition computed without loop
    outputs": the body's condition must be a scalar BOOL produced inside the body from the loop's
    own state, never a value taken from outside the loop (which would make the while-limit constant)."""
    body = dict(_subgraphs(node)).get("body")
    if body is None:
        report.add("error", name, "Loop", "Loop without a body")
        return
    bscope = _Scope(body, scope, name)
    trip = node.input[0] if node.input else ""
    cond = node.input[1] if len(node.input) > 1 else ""
    carried = list(node.input[2:])
    n, k = len(carried), len(body.output) - 1 - len(carried)

    # trip count: a 0D INT32 tensor in TensorRT; onnx-tensorrt casts it and drops constants >= INT32_MAX
    trip_value = scope.weights(trip) if trip else None
    if trip_value is not None:
        if np.asarray(trip_value).size != 1:
            report.add("error", name, "Loop", f"trip count {trip!r} must be a scalar, got shape {list(np.shape(trip_value))}")
        elif int(np.asarray(trip_value).reshape(-1)[0]) > INT32_MAX:
            report.add("error", name, "Loop", (
                f"trip count {trip!r} = {int(np.asarray(trip_value).reshape(-1)[0])} is not INT32-representable: "
                "TensorRT's ILoop takes a 0D INT32 trip limit and onnx-tensorrt drops constant trip counts "
                ">= 2^31-1, so the cap would be ignored"))
        elif int(np.asarray(trip_value).reshape(-1)[0]) == INT32_MAX:
            report.add("warning", name, "Loop", (
                f"trip count {trip!r} = INT32_MAX: onnx-tensorrt treats it as 'no trip limit' (condition only)"))
    elif trip:
        t = scope.type(trip)
        report.add("info", name, "Loop", (
            f"trip count {trip!r} is a runtime value ({_type_name(t.elem) or 'unknown type'}): onnx-tensorrt casts "
            "it to INT32, so values beyond 2^31-1 must be rejected before they reach the engine"))
    if not trip and not cond:
        report.add("error", name, "Loop", "neither a trip count nor a condition: TensorRT needs a trip limit")

    # the condition: body output 0 feeds the kWHILE recurrence through convertToScalar
    if cond and body.output:
        out = body.output[0].name
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

    # loop-carried tensors: IRecurrenceLayer needs the same shape every iteration ([matrix])
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
        if t is not None and t not in SUPPORT_MATRIX["Loop"][1]:
            report.add("warning", name, "Loop", f"carried value #{i} is {t}, not among the documented Loop types")

    # scan outputs: their length is the trip count, which must be a build-time constant and the only limit
    if k > 0:
        scans = [o.name for o in body.output[1 + n:]]
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


_RULES = {
    "Resize": _rule_resize,
    "MaxPool": _rule_pool,
    "AveragePool": _rule_pool,
    "LpPool": _rule_pool,
    **{op: _rule_reduce for op in _REDUCE},
    "Squeeze": _rule_squeeze,
    "Unsqueeze": _rule_squeeze,
    "TopK": _rule_topk,
    "CumSum": _rule_build_time_input(1, "axis"),
    "OneHot": _rule_build_time_input(1, "depth"),
    "Dropout": _rule_dropout,
    "Constant": _rule_constant,
    "Cast": _rule_cast,
    "CastLike": _rule_cast,
    "ScatterND": _rule_scatternd,
    "LayerNormalization": _rule_layernorm,
    "LSTM": _rule_lstm,
    "EyeLike": _rule_eyelike,
    "DequantizeLinear": _rule_zero_point(2, "x_zero_point"),
    "QuantizeLinear": _rule_zero_point(2, "y_zero_point"),
    "GridSample": _rule_gridsample,
    "If": _rule_if,
    "Loop": _rule_loop,
}
