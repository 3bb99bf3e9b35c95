"""Compose encoder -> ONNX `Loop`(step) -> readout from one exported "pieces" graph.

`torch.onnx.export(dynamo=True)` has no clean path to an early-exit loop whose budget is a
graph input, so the three pieces are exported side by side in one graph (one export instead of
three: the exporter's fixed cost dominates) and rewired here with `onnx.helper`:

- encoder:  images -> enc_ctx_0.., h0, active0, iterations0, residual0
- step:     ctx_0.., h, active, iterations, residual, tol[, trip, max_iters]
            -> cond, h_next, active_next, iterations_next, residual_next
- readout:  readout_ctx_0.., h_final -> heads

The readout gets its own ctx inputs: the exporter materialises a symbolic size from any input that
carries its symbol, and the step ties ctx to h, so a shared ctx would let the readout read the
step's `h`. Extraction checks that each piece reads only its own inputs. Every other name gets its piece's prefix, so constants cannot collide. The step becomes the Loop
body; it reads ctx, tol and max_iters from the outer scope. Each trip runs `substeps` steps (the
step graph then stops each sample at max_iters itself).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import onnx
from onnx import GraphProto, ModelProto, TensorProto, helper

CARRIED = ("h", "active", "iterations", "residual", "streak")


@dataclass(frozen=True)
class PieceNames:
    """The interface names the exporter must give the pieces graph."""

    ctx: tuple[str, ...]
    heads: tuple[str, ...]
    substeps: int = 1
    halting: bool = False  # a policy beyond tol: its threshold and patience are step (and graph) inputs

    @property
    def encoder_outputs(self) -> list[str]:
        return [f"enc_{c}" for c in self.ctx] + [f"{c}0" for c in CARRIED]

    @property
    def step_inputs(self) -> list[str]:
        extra = ["trip", "max_iters"] if self.substeps > 1 else []
        return [*self.ctx, *CARRIED, "tol", *self.policy_inputs, *extra]

    @property
    def policy_inputs(self) -> list[str]:
        return ["threshold", "patience"] if self.halting else []

    @property
    def step_outputs(self) -> list[str]:
        return ["cond"] + [f"{c}_next" for c in CARRIED]

    @property
    def readout_inputs(self) -> list[str]:
        return [f"readout_{c}" for c in self.ctx] + ["h_final"]

    @property
    def inputs(self) -> list[str]:
        return ["images", *self.step_inputs, *self.readout_inputs]

    @property
    def outputs(self) -> list[str]:
        return [*self.encoder_outputs, *self.step_outputs, *self.heads]


def _subgraphs(node: onnx.NodeProto):
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def _extract(graph: GraphProto, outputs: list[str], inputs: list[str], name: str) -> GraphProto:
    """The nodes, initializers and inputs that `outputs` depend on, in the original order."""
    producer = {o: i for i, node in enumerate(graph.node) for o in node.output}
    needed_nodes: set[int] = set()
    needed_values: set[str] = set()
    stack = list(outputs)
    while stack:
        value = stack.pop()
        if value in needed_values or not value:
            continue
        needed_values.add(value)
        idx = producer.get(value)
        if idx is not None and idx not in needed_nodes:
            needed_nodes.add(idx)
            node = graph.node[idx]
            stack.extend(node.input)
            for sub in _subgraphs(node):  # values a subgraph reads from outside
                stack.extend(n for s in sub.node for n in s.input)
    foreign = sorted(v.name for v in graph.input if v.name in needed_values and v.name not in inputs)
    if foreign:
        raise ValueError(f"the {name} piece reads inputs of another piece: {foreign}")
    declared = {v.name: v for v in list(graph.input) + list(graph.output) + list(graph.value_info)}
    missing = [o for o in outputs if o not in declared]
    if missing:
        raise ValueError(f"the pieces graph does not declare {missing}")
    return helper.make_graph(
        [graph.node[i] for i in sorted(needed_nodes)],
        name,
        [v for v in graph.input if v.name in needed_values],
        [declared[o] for o in outputs],
        initializer=[t for t in graph.initializer if t.name in needed_values],
        value_info=[v for v in graph.value_info if v.name in needed_values],
    )


def _rename(graph: GraphProto, mapping: dict[str, str], prefix: str) -> None:
    """Rename every value in place: names in `mapping` as given, all others get `prefix`."""

    def new(name: str) -> str:
        return mapping.get(name, prefix + name) if name else name  # "" is an omitted optional input

    for seq in (graph.input, graph.output, graph.value_info, graph.initializer):
        for v in seq:
            v.name = new(v.name)
    for node in graph.node:
        node.input[:] = [new(n) for n in node.input]
        node.output[:] = [new(n) for n in node.output]
        node.name = prefix + node.name if node.name else ""
        for sub in _subgraphs(node):
            _rename(sub, mapping, prefix)


def _dedupe_initializers(graph: GraphProto) -> None:
    """Merge initializers with identical contents (the pieces each carry their own copy)."""
    inputs = {v.name for v in graph.input}  # overridable defaults (max_iters, tol) never merge
    seen: dict[tuple, str] = {}
    alias: dict[str, str] = {}
    kept = []
    for init in graph.initializer:
        if init.name in inputs:
            kept.append(init)
            continue
        anonymous = TensorProto()
        anonymous.CopyFrom(init)
        anonymous.name = ""
        key = (init.data_type, tuple(init.dims), hashlib.sha256(anonymous.SerializeToString(deterministic=True)).hexdigest())
        if key in seen:
            alias[init.name] = seen[key]
        else:
            seen[key] = init.name
            kept.append(init)
    if not alias:
        return
    del graph.initializer[:]
    graph.initializer.extend(kept)

    def fix(g: GraphProto) -> None:
        for node in g.node:
            node.input[:] = [alias.get(n, n) for n in node.input]
            for sub in _subgraphs(node):
                fix(sub)

    fix(graph)


def _passthrough(graph: GraphProto, names: list[str], outer: set[str]) -> None:
    """A (sub)graph output must be made by one of its nodes: copy inputs passed straight through."""
    defined = {o for node in graph.node for o in node.output}
    for out in graph.output:
        if out.name in names and (out.name not in defined or out.name in outer):
            source = out.name
            out.name = f"{source}/copy"
            graph.node.append(helper.make_node("Identity", [source], [out.name]))


def compose_loop(
    pieces: ModelProto,
    names: PieceNames,
    *,
    max_iters: int,
    tol: float,
    images: onnx.ValueInfoProto,
    threshold: float | None = None,
    patience: int = 1,
    outputs: list[onnx.ValueInfoProto],
) -> ModelProto:
    """One model: encoder nodes, a `Loop` over the step graph, readout nodes.

    `max_iters` and `tol` become graph inputs with initializers of the same name: their values are
    the defaults and any call may feed its own (IR >= 4); so do a halting policy's `threshold` and
    `patience`. `images` / `outputs` give declared types.
    """
    if len(pieces.functions):
        raise ValueError("the exported pieces contain ONNX functions; compose expects them inlined")
    src = pieces.graph
    enc = _extract(src, names.encoder_outputs, ["images"], "encoder")
    body = _extract(src, names.step_outputs, names.step_inputs, "step_body")
    read = _extract(src, list(names.heads), names.readout_inputs, "readout")
    ctx = {c: c for c in names.ctx}

    _rename(enc, {"images": "images", **{f"enc_{c}": c for c in names.ctx},
                  **{f"{c}0": f"loop/{c}0" for c in CARRIED}}, "encode/")

    # step body: (trip, cond_in, carried...) -> (cond_out, carried...). Its weights stay initializers
    # *of the body*: onnxruntime only rewrites convs to its fast blocked layout (NCHWc) when the
    # weights are constants of the same graph; read from the outer scope, they were not (measured).
    body_io = {c: f"step/in/{c}" for c in CARRIED} | {f"{c}_next": f"step/out/{c}" for c in CARRIED}
    outer = {**ctx, "tol": "tol", "max_iters": "max_iters", **{n: n for n in names.policy_inputs}}
    _rename(body, {**body_io, **outer, "trip": "step/trip", "cond": "step/out/cond"}, "step/")
    by_name = {v.name: v for v in body.input}
    carried_in = [by_name.get(f"step/in/{c}") or helper.make_empty_tensor_value_info(f"step/in/{c}") for c in CARRIED]
    del body.input[:]
    body.input.extend([helper.make_tensor_value_info("step/trip", TensorProto.INT64, []),
                       helper.make_tensor_value_info("step/cond_in", TensorProto.BOOL, []), *carried_in])
    _passthrough(body, [v.name for v in body.output], {*outer, *(v.name for v in body.input)})

    _rename(read, {**{f"readout_{c}": c for c in names.ctx}, "h_final": "loop/h", **{h: h for h in names.heads}},
            "readout/")

    nodes = list(enc.node)
    nodes.append(helper.make_node("Constant", [], ["loop/cond0"], value=helper.make_tensor("", TensorProto.BOOL, [], [True])))
    trips = "max_iters"
    if names.substeps > 1:  # ceil(max_iters / k) trips
        k = names.substeps
        nodes.append(helper.make_node("Constant", [], ["loop/k1"], value=helper.make_tensor("", TensorProto.INT64, [], [k - 1])))
        nodes.append(helper.make_node("Constant", [], ["loop/k"], value=helper.make_tensor("", TensorProto.INT64, [], [k])))
        nodes.append(helper.make_node("Add", ["max_iters", "loop/k1"], ["loop/ceil_num"]))
        nodes.append(helper.make_node("Div", ["loop/ceil_num", "loop/k"], ["loop/trips"]))
        trips = "loop/trips"
    nodes.append(helper.make_node(
        "Loop", [trips, "loop/cond0", *(f"loop/{c}0" for c in CARRIED)],
        ["loop/h", "loop/active", "iterations", "residual", "loop/streak"], name="recurrence", body=body,
    ))
    nodes.extend(read.node)
    inputs = [images, helper.make_tensor_value_info("max_iters", TensorProto.INT64, []),
              helper.make_tensor_value_info("tol", TensorProto.FLOAT, [])]
    defaults = [helper.make_tensor("max_iters", TensorProto.INT64, [], [int(max_iters)]),
                helper.make_tensor("tol", TensorProto.FLOAT, [], [float(tol)])]
    if names.halting:
        inputs += [helper.make_tensor_value_info("threshold", TensorProto.FLOAT, []),
                   helper.make_tensor_value_info("patience", TensorProto.INT64, [])]
        defaults += [helper.make_tensor("threshold", TensorProto.FLOAT, [], [float(threshold)]),
                     helper.make_tensor("patience", TensorProto.INT64, [], [int(patience)])]
    graph = helper.make_graph(
        nodes,
        "crbp_recurrent_segmenter",
        inputs,
        outputs,
        initializer=[*defaults, *enc.initializer, *read.initializer],
        value_info=[*enc.value_info, *read.value_info],
    )
    _dedupe_initializers(graph)
    model = helper.make_model(graph, opset_imports=list(pieces.opset_import), ir_version=pieces.ir_version,
                              producer_name="crbp-deploy")
    return model
