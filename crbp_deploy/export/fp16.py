"""fp16 ONNX graphs with onnxconverter-common's float16 converter, the convergence test kept fp32.

`convert_float_to_float16(keep_io_types=True)` turns every float tensor of a graph into fp16 and
casts at the graph's inputs and outputs. Three things it would get wrong here, handled around it:

1. **The convergence test.** The relative change ||h_t - h_(t-1)|| / ||h_(t-1)|| sums the squares
   of a whole state (thousands of values: in fp16 the sum can pass 65504, and the 1e-12 floor
   becomes the converter's 1e-7), and `residual > tol` / IsInf / IsNaN on it decide when each sample stops. These nodes
   are found by data flow (`fp32_nodes`) and passed as the converter's `node_block_list`: the
   converter then keeps them fp32 and casts at their boundary (the fp16 state is cast up before the
   flatten that starts the relative change).
2. **Mask arithmetic.** `active.float()` (a Cast *to* float from bool) feeding NonZero / ReduceMax
   is an index computation; the converter relabels the Cast's output fp16 but leaves its `to=FLOAT`,
   an invalid graph. Such casts and the nodes that only read them stay fp32 too.
3. **Loops.** The converter does descend into Loop bodies, but it retypes every float body input
   and output to fp16 -- the carried residual included -- and converts the initializer of the `tol`
   graph input while the input stays fp32 (tried on a whole Loop artifact: the checker fails and ONNX
   Runtime refuses it, "Data in initializer 'tol' has element type tensor(float16) but usage of
   initializer in graph expects tensor(float)"). So the exporter
   converts the *pieces* graph (encoder, one step, readout side by side, no Loop yet; see loop.py)
   before composing the Loop: every piece interface (state, residual, tol, ctx) stays fp32, each
   trip casts its inputs down and its state up. An unrolled graph has no Loop and is converted whole.

Around the converter: initializers lose their value_info and graph outputs made by fp32 nodes are
detached for the conversion (two converter bugs, see `_drop_initializer_value_info` and
`_detach_outputs`); afterwards `_tidy` removes the Cast(fp32->fp16)->Cast(fp16->fp32) pairs left in
front of fp32 nodes (the fp32 `tol` input would otherwise be rounded to fp16 and back) and repeated
casts. tests/test_fp16_export.py checks the result's types (fp32 I/O, residual path, tol, Loop
carries; fp16 convolutions) and runs it on ONNX Runtime against PyTorch.

ONNX Runtime's CPU provider runs such a graph, but (1.31, this machine) computes none of its
arithmetic in fp16: it casts fp16 ops up to fp32. `onnxruntime_execution` measures that from a
profiled run, and `verify` reports it, so a CPU check is never mistaken for an fp16 one.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import onnx
from onnx import GraphProto, ModelProto, TensorProto, helper

from ..artifact import read_sidecar, write_sidecar
from ..errors import CrbpError, InputError

PACKAGE = "onnxconverter-common"
INSTALL = "pip install 'crbp-deploy[fp16]'"
FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16
#: Constants are clamped into fp16's range, not the converter's default 1e4 (which would change e.g. a 3e4
#: fill value): the largest finite fp16, and the smallest positive normal-ish value it keeps by default.
MAX_FINITE, MIN_POSITIVE = 65504.0, 1e-7
#: Comparisons of the residual: always fp32 (with whatever reaches them through the residual path).
_TESTS = {"IsInf", "IsNaN", "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "Equal"}
#: Ops that ONNX Runtime's CPU provider (1.31) has no fp16 kernel for and that only ever see index or
#: mask data here: kept fp32 wherever they appear.
_CPU_FP32_ONLY = {"NonZero"}


def converter_missing() -> str | None:
    """None when onnxconverter-common's float16 tools import, else the one line to print."""
    try:
        from onnxconverter_common import float16  # noqa: F401
    except ImportError:
        return f"--fp16 needs the {PACKAGE} package, which is not installed; install it with: {INSTALL}"
    return None


def require_converter() -> None:
    missing = converter_missing()
    if missing:
        raise InputError(missing)


@dataclass
class Fp16Summary:
    """What the conversion kept fp32 (node names, counts per op) and what it made fp16."""

    kept_fp32: list[str] = field(default_factory=list)
    kept_fp32_ops: dict[str, int] = field(default_factory=dict)
    fp16_initializers: int = 0
    casts: int = 0
    clamped_values: int = 0  # finite constants outside [MIN_POSITIVE, MAX_FINITE] in magnitude, clamped into it

    def to_dict(self) -> dict:
        return {"kept_fp32_ops": self.kept_fp32_ops, "kept_fp32_nodes": len(self.kept_fp32),
                "fp16_initializers": self.fp16_initializers, "casts": self.casts,
                "clamped_values": self.clamped_values, "range": [MIN_POSITIVE, MAX_FINITE]}


# --- which nodes stay fp32 ---------------------------------------------------------------------


def _types(model: ModelProto) -> dict[str, tuple[int, int | None]]:
    """name -> (elem type, rank or None) over the top graph, from shape inference."""
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    out: dict[str, tuple[int, int | None]] = {}
    for vi in [*g.input, *g.output, *g.value_info]:
        t = vi.type.tensor_type
        out[vi.name] = (t.elem_type, len(t.shape.dim) if t.HasField("shape") else None)
    for init in g.initializer:
        out[init.name] = (init.data_type, len(init.dims))
    return out


def fp32_nodes(model: ModelProto, residual_outputs: Sequence[str]) -> set[str]:
    """Names of the nodes of `model.graph` that must stay fp32.

    - the residual path: backwards from each `residual_outputs` value through float tensors of rank
      <= 2 (the relative change works on the state flattened to N x D; the state itself has rank 4,
      so the walk stops at the flatten and never enters the step);
    - forward from there and from casts of masks to float (`active.float()`): any node whose float
      inputs all come from fp32 nodes, graph inputs or constants (Greater(residual, tol), IsInf,
      IsNaN, Where/ScatterND of the residual, NonZero / ReduceMax of a mask);
    - the ops listed in `_CPU_FP32_ONLY`.
    """
    graph = model.graph
    types = _types(model)
    producer = {o: n for n in graph.node for o in n.output if o}
    neutral = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    neutral |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}

    def is_float(name: str) -> bool:
        return types.get(name, (0, None))[0] == FLOAT

    def small(name: str) -> bool:
        rank = types.get(name, (0, None))[1]
        return rank is not None and rank <= 2

    kept: set[str] = set()
    stack = [producer[r] for r in residual_outputs if r in producer]
    while stack:  # backwards along the residual path
        node = stack.pop()
        if node.name in kept or node.op_type == "Constant":
            continue
        if not all(small(o) for o in node.output if o and is_float(o)):
            continue
        kept.add(node.name)
        stack.extend(producer[i] for i in node.input if i in producer and is_float(i))
    for node in graph.node:
        if node.op_type in _CPU_FP32_ONLY or (
            node.op_type == "Cast" and _cast_to(node) == FLOAT and node.input and not is_float(node.input[0])
        ):
            kept.add(node.name)
    fp32_values = {o for n in graph.node if n.name in kept for o in n.output}
    changed = True
    while changed:  # forwards: what only reads fp32 values stays fp32
        changed = False
        for node in graph.node:
            if node.name in kept or node.op_type == "Constant":
                continue
            floats = [i for i in node.input if i and is_float(i)]
            if floats and any(i in fp32_values for i in floats) and all(i in fp32_values or i in neutral for i in floats):
                if node.op_type in _TESTS or all(small(o) or not is_float(o) for o in node.output if o):
                    kept.add(node.name)
                    fp32_values.update(node.output)
                    changed = True
    return kept


def _cast_to(node: onnx.NodeProto) -> int | None:
    return next((a.i for a in node.attribute if a.name == "to"), None)


# --- conversion --------------------------------------------------------------------------------


def _unique_names(graph: GraphProto) -> None:
    """The converter blocks nodes by name: give every node a unique one."""
    seen: set[str] = set()
    for i, node in enumerate(graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.name or node.op_type}/fp16_{i}"
        seen.add(node.name)


def _drop_initializer_value_info(graph: GraphProto) -> None:
    """The exporter declares value_info for its folded constants. The converter retypes every value_info
    to fp16, then "casts" an fp32 node's initializer input from fp16 to fp32 -- which hides the
    initializer from its own blocked-input list, so the constant itself was converted too (the 1e-12
    floor of the relative change became 1e-7). Initializers carry their type: their value_info goes."""
    inits = {t.name for t in graph.initializer}
    keep = [vi for vi in graph.value_info if vi.name not in inits]
    del graph.value_info[:]
    graph.value_info.extend(keep)


def _materialize_constant_outputs(graph: GraphProto) -> set[str]:
    """A graph output that is an initializer (a static export folds the start state, the all-true mask and
    the inf residual into constants) would be converted to fp16 under its fp32 output declaration; each
    becomes an fp32 Identity of a renamed initializer. Returns the Identity nodes' names (kept fp32)."""
    inits = {t.name: t for t in graph.initializer}
    made = set()
    for out in graph.output:
        init = inits.get(out.name)
        if init is None:
            continue
        init.name = f"{out.name}/const"
        node = helper.make_node("Identity", [init.name], [out.name], name=f"{out.name}/const_output")
        graph.node.append(node)
        made.add(node.name)
    return made


def _private_constants(graph: GraphProto, kept: set[str]) -> None:
    """Constants read by fp32 nodes and by fp16 nodes get a private copy for the fp32 ones, so the
    converter leaves the fp32 copy alone (e.g. the 1e-12 floor of the relative change stays 1e-12)."""
    inits = {t.name: t for t in graph.initializer if t.data_type == FLOAT}
    const_nodes = {n.output[0]: n for n in graph.node if n.op_type == "Constant"
                   and any(a.name == "value" and a.t.data_type == FLOAT for a in n.attribute)}
    readers: dict[str, set[bool]] = {}
    for node in graph.node:
        for i in node.input:
            readers.setdefault(i, set()).add(node.name in kept)
    new_nodes = []
    for node in graph.node:
        if node.name not in kept:
            continue
        for k, name in enumerate(node.input):
            if readers.get(name) != {True, False}:
                if name in const_nodes and readers.get(name) == {True}:
                    kept.add(const_nodes[name].name)  # read by fp32 nodes only: keep it fp32
                continue
            copy = f"{name}/fp32"
            if name in inits and copy not in inits:
                t = TensorProto()
                t.CopyFrom(inits[name])
                t.name = copy
                graph.initializer.append(t)
                inits[copy] = t
            elif name in const_nodes and not any(copy in n.output for n in new_nodes):
                c = onnx.NodeProto()
                c.CopyFrom(const_nodes[name])
                c.output[0] = copy
                c.name = f"{c.name}/fp32"
                kept.add(c.name)
                new_nodes.append(c)
            if name in inits or name in const_nodes:
                node.input[k] = copy
    if new_nodes:  # before their readers
        nodes = [*new_nodes, *graph.node]
        del graph.node[:]
        graph.node.extend(nodes)


def _detach_outputs(graph: GraphProto, kept: set[str], blocked_ops: set[str]) -> list[tuple[int, onnx.ValueInfoProto, str]]:
    """Graph outputs made by fp32 nodes (ours or the converter's blocked ops) leave the output list
    during conversion.

    The converter casts every output of a blocked node to fp16 and, when that output is also a graph
    output, the cast stays: the fp32 `residual` output came out fp16 and its readers (IsInf) were
    left reading fp16 without a cast (onnxconverter-common 1.16.0). Renamed to an internal value
    here, they are outputs again after conversion, read from the fp32 value (`_reattach_outputs`).
    """
    producer = {o: n for n in graph.node for o in n.output}
    detached = []
    for index, out in reversed(list(enumerate(graph.output))):
        node = producer.get(out.name)
        blocked = node is not None and (node.name in kept or node.op_type in blocked_ops)
        if not blocked or out.type.tensor_type.elem_type != FLOAT:
            continue
        inner = f"{out.name}/fp32"
        for n in graph.node:
            n.input[:] = [inner if i == out.name else i for i in n.input]
            n.output[:] = [inner if o == out.name else o for o in n.output]
        vi = graph.value_info.add()
        vi.CopyFrom(out)
        vi.name = inner
        saved = onnx.ValueInfoProto()
        saved.CopyFrom(out)
        detached.append((index, saved, inner))
        del graph.output[index]
    return detached[::-1]


def _split_read_outputs(graph: GraphProto) -> None:
    """A float graph output that nodes of the graph also read: the converter casts the output to fp32 under
    its name and leaves those readers on the fp32 value (an fp16 Conv then got an fp32 input). Each
    such output gets an Identity; the graph's own readers keep the (fp16) value behind it."""
    outputs = {o.name for o in graph.output if o.type.tensor_type.elem_type == FLOAT}
    read = {i for n in graph.node for i in n.input} & outputs & {o for n in graph.node for o in n.output}
    for name in sorted(read):
        inner = f"{name}/value"
        for n in graph.node:
            n.input[:] = [inner if i == name else i for i in n.input]
            n.output[:] = [inner if o == name else o for o in n.output]
        graph.node.append(helper.make_node("Identity", [inner], [name], name=f"{name}/output"))


def _reattach_outputs(graph: GraphProto, detached: list[tuple[int, onnx.ValueInfoProto, str]]) -> None:
    producer = {o: n for n in graph.node for o in n.output}
    for index, out, inner in detached:
        source = inner
        up = producer.get(inner)
        if up is not None and up.op_type == "Cast" and _cast_to(up) == HALF:
            source = up.input[0]  # the fp32 value in front of the converter's cast
        graph.node.append(helper.make_node("Identity", [source], [out.name], name=f"{out.name}/output"))
        graph.output.insert(index, out)


def _tidy(graph: GraphProto) -> None:
    """Remove Cast(->fp16) -> Cast(->fp32) pairs whose source is fp32, repeated casts of one value, and
    casts nobody reads."""
    producer = {o: n for n in graph.node for o in n.output}
    types = {vi.name: vi.type.tensor_type.elem_type for vi in [*graph.input, *graph.value_info, *graph.output]}
    types.update({t.name: t.data_type for t in graph.initializer})
    for node in graph.node:
        for k, name in enumerate(node.input):
            up = producer.get(name)
            if up is None or up.op_type != "Cast" or _cast_to(up) != FLOAT:
                continue
            first = producer.get(up.input[0])
            if first is not None and first.op_type == "Cast" and _cast_to(first) == HALF and types.get(first.input[0]) == FLOAT:
                node.input[k] = first.input[0]
    first_cast: dict[tuple[str, int | None], str] = {}
    alias: dict[str, str] = {}
    for node in graph.node:  # the converter casts a graph input once per reader: one cast per (value, type)
        node.input[:] = [alias.get(i, i) for i in node.input]
        if node.op_type == "Cast":
            key = (node.input[0], _cast_to(node))
            if key in first_cast:
                alias[node.output[0]] = first_cast[key]
            else:
                first_cast[key] = node.output[0]
    outputs = {o.name for o in graph.output}
    while True:
        read = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if n.op_type == "Cast" and n.output[0] not in read]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    live = {i for n in graph.node for i in n.input} | {o for n in graph.node for o in n.output}
    keep = [vi for vi in graph.value_info if vi.name in live]
    del graph.value_info[:]
    graph.value_info.extend(keep)


def convert(model: ModelProto, residual_outputs: Sequence[str]) -> tuple[ModelProto, Fp16Summary]:
    """`model` (a flat graph: no Loop) with float math in fp16, I/O and the convergence test fp32."""
    require_converter()
    from onnxconverter_common import float16

    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in model.graph.node for a in n.attribute):
        raise CrbpError("fp16 conversion expects a graph without subgraphs (convert the pieces before the Loop)")
    model = _copy(model)
    _unique_names(model.graph)
    _drop_initializer_value_info(model.graph)
    constant_outputs = _materialize_constant_outputs(model.graph)
    kept = fp32_nodes(model, residual_outputs) | constant_outputs
    _private_constants(model.graph, kept)
    blocked_ops = set(float16.DEFAULT_OP_BLOCK_LIST)  # ops the converter always keeps fp32 (Resize, Max, ...)
    detached = _detach_outputs(model.graph, kept, blocked_ops)
    _split_read_outputs(model.graph)
    clamped = _out_of_range(model.graph, kept, blocked_ops)
    try:
        with warnings.catch_warnings():  # it warns for every +-inf constant, which it keeps as inf
            warnings.simplefilter("ignore", UserWarning)
            converted = float16.convert_float_to_float16(
                model, keep_io_types=True, op_block_list=sorted(blocked_ops), node_block_list=sorted(kept),
                min_positive_val=MIN_POSITIVE, max_finite_val=MAX_FINITE,
            )
    except Exception as exc:  # the converter asserts and raises ValueError on graphs it cannot handle
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CrbpError(f"fp16 conversion ({PACKAGE}) failed: {first}") from exc
    _reattach_outputs(converted.graph, detached)
    _tidy(converted.graph)
    ops: dict[str, int] = {}
    for n in converted.graph.node:
        if n.name in kept:
            ops[n.op_type] = ops.get(n.op_type, 0) + 1
    summary = Fp16Summary(
        kept_fp32=sorted(kept), kept_fp32_ops=dict(sorted(ops.items())),
        fp16_initializers=sum(t.data_type == HALF for t in converted.graph.initializer),
        casts=sum(n.op_type == "Cast" for n in converted.graph.node), clamped_values=clamped,
    )
    return converted, summary


def _out_of_range(graph: GraphProto, kept: set[str], blocked_ops: set[str]) -> int:
    """How many finite constants bound for fp16 lie outside what the converter keeps (it clamps them)."""
    from onnx import numpy_helper

    blocked_inputs = {i for n in graph.node if n.name in kept or n.op_type in blocked_ops for i in n.input}
    tensors = [t for t in graph.initializer if t.name not in blocked_inputs]
    tensors += [a.t for n in graph.node if n.name not in kept and n.op_type not in blocked_ops for a in n.attribute
                if a.type == onnx.AttributeProto.TENSOR]
    count = 0
    for t in tensors:
        if t.data_type != FLOAT:
            continue
        v = np.abs(numpy_helper.to_array(t).astype(np.float64))
        count += int(np.sum(np.isfinite(v) & ((v > MAX_FINITE) | ((v > 0) & (v < MIN_POSITIVE)))))
    return count


def _copy(model: ModelProto) -> ModelProto:
    out = ModelProto()
    out.CopyFrom(model)
    return out


# --- checks on a finished artifact -------------------------------------------------------------


def _graphs(graph: GraphProto) -> Iterable[GraphProto]:
    yield graph
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(a.g)
            for g in a.graphs:
                yield from _graphs(g)


def precision_of(model: ModelProto) -> str:
    """'fp16' when any initializer or Cast of the graph (subgraphs included) is fp16, else 'fp32'."""
    for g in _graphs(model.graph):
        if any(t.data_type == HALF for t in g.initializer):
            return "fp16"
        if any(n.op_type == "Cast" and _cast_to(n) == HALF for n in g.node):
            return "fp16"
    return "fp32"


#: Ops that only move or reshape data: not counted as arithmetic when reporting what ran in fp16.
_DATA_OPS = {"Cast", "Shape", "Gather", "GatherElements", "GatherND", "ScatterND", "ScatterElements", "Concat",
             "Expand", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Transpose", "Slice", "Split", "Loop", "If",
             "Constant", "ConstantOfShape", "NonZero", "ReorderInput", "ReorderOutput", "Flatten", "Tile", "Pad"}


def onnxruntime_execution(path, providers: Sequence[str] | None = None, size: int | None = None) -> dict:
    """Which nodes ONNX Runtime really ran with fp16 tensors: one profiled run on a small image.

    ONNX Runtime's CPU provider has fp16 kernels for few ops; for the rest it inserts casts to fp32
    (`InsertedPrecisionFreeCast_*`) and computes in fp32, so an fp16 graph that *runs* on CPU has not
    necessarily *computed* in fp16. Counts are of distinct nodes (a Loop body node counts once).
    """
    import json
    import tempfile
    from pathlib import Path

    import numpy as np
    import onnxruntime as ort

    from ..artifact import ArtifactMeta

    meta = ArtifactMeta.from_props({p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props})
    side = size or 16 * max(1, meta.size_multiple)
    images = np.random.default_rng(0).random((1, meta.in_channels, side, side), dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(str(path), options, providers=list(providers or ["CPUExecutionProvider"]))
        session.run(None, {"images": images})
        events = json.loads(Path(session.end_profiling()).read_text())
    fp16_ops: dict[str, set[str]] = {}
    fp32_ops: dict[str, set[str]] = {}
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        args = e.get("args", {})
        dtypes = {k for side_ in ("input_type_shape", "output_type_shape") for d in args.get(side_, []) for k in d}
        target = fp16_ops if "float16" in dtypes else fp32_ops
        target.setdefault(args.get("op_name", "?"), set()).add(e["name"][: -len("_kernel_time")])
    count = lambda ops: {op: len(names) for op, names in sorted(ops.items())}  # noqa: E731
    arith16 = sum(len(v) for op, v in fp16_ops.items() if op not in _DATA_OPS)
    arith = arith16 + sum(len(v) for op, v in fp32_ops.items() if op not in _DATA_OPS)
    inserted = {n for ops in (fp16_ops, fp32_ops) for n in ops.get("Cast", set()) if "InsertedPrecisionFreeCast" in n}
    return {"providers": session.get_providers(), "fp16_nodes": count(fp16_ops), "other_nodes": count(fp32_ops),
            "arithmetic_nodes": arith, "arithmetic_nodes_fp16": arith16, "casts_inserted_by_onnxruntime": len(inserted)}


def execution_check(path):
    """A `verify` check (always passes, informational): how much of the fp16 graph ONNX Runtime ran in fp16."""

    def fp16_execution(reference, candidate) -> dict:
        info = onnxruntime_execution(path, getattr(candidate, "providers", None))
        gpu = any(p != "CPUExecutionProvider" for p in info["providers"])
        where = "onnxruntime " + "/".join(p.replace("ExecutionProvider", "") for p in info["providers"])
        if info["arithmetic_nodes_fp16"] == 0:
            note = (f"{where} ran none of the {info['arithmetic_nodes']} arithmetic nodes in fp16: it cast them up to "
                    f"fp32 ({info['casts_inserted_by_onnxruntime']} casts inserted), so this verifies the fp16 graph, "
                    "its fp16 weights and casts, not fp16 arithmetic")
        else:
            note = (f"{where} ran {info['arithmetic_nodes_fp16']} of {info['arithmetic_nodes']} arithmetic nodes "
                    f"in fp16 and cast the rest up to fp32")
        if not gpu:
            note += "; fp16 execution on a GPU (TensorRT, onnxruntime CUDA) was not run here"
        return {"name": "fp16_execution", "passed": True, "informational": True, **info, "note": note}

    return fp16_execution


def missing_kernel(exc: Exception) -> bool:
    """The error is onnxruntime's "no kernel for this op and type" (session creation or run), not a failed
    verification (which carries a report)."""
    words = ("NOT_IMPLEMENTED", "Could not find an implementation")
    return getattr(exc, "report", None) is None and any(k in str(exc) for k in words)


def skip_verification(artifact, exc: Exception) -> dict:
    """An fp16 artifact the runtime has no kernels for: a skipped report, also written to its sidecar."""
    reason = f"onnxruntime has no fp16 kernel for part of this graph ({exc})"
    report = {"passed": None, "skipped": True, "precision": "fp16", "reason": reason}
    sidecar = read_sidecar(artifact)
    if sidecar is not None:
        sidecar["verification"] = report
        write_sidecar(artifact, sidecar)
    return report


def artifact_precision(artifact) -> str:
    """"fp16" or "fp32", as the artifact's sidecar records it."""
    sidecar = read_sidecar(artifact) or {}
    return sidecar.get("precision") or ("fp16" if sidecar.get("fp16") else "fp32")


__all__ = ["Fp16Summary", "INSTALL", "PACKAGE", "artifact_precision", "convert", "converter_missing",
           "execution_check", "fp32_nodes", "missing_kernel", "onnxruntime_execution", "precision_of",
           "require_converter", "skip_verification"]
