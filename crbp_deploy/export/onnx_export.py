"""ONNX export of any recurrent-segmenter-contract model, fixed-count or early-exit.

- `unrolled`: N steps traced into one flat graph (torch.onnx dynamo exporter).
- `loop`: encoder -> ONNX `Loop`(step) -> readout. The three pieces are exported with the
  dynamo exporter and composed in `loop.py`; `max_iters` and `tol` are graph inputs whose
  initializers hold the defaults, so every call can set its own budget. Each Loop trip runs
  `substeps` steps of the solver's `advance` (models/solver.py), the same per-sample bookkeeping
  as the eager model, so iteration counts match. The body is compacted (only the samples still
  running are stepped) or masked (`execution`).

The artifact describes itself twice: `metadata_props` in the .onnx (read by the runtime) and a
JSON sidecar `<name>.onnx.json` (model card, I/O schema, defaults, verification numbers).
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch
from onnx import TensorProto, helper
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from ..artifact import SIDECAR_FORMAT, SIDECAR_VERSION, STRATEGIES, ArtifactMeta, check_writable, sidecar_bytes
from ..artifact import read_sidecar, sidecar_path, write_atomic, write_sidecar  # noqa: F401  (they lived here)
from ..budget import Budget
from ..errors import CrbpError, InputError
from ..models import RecurrentSegmenter, solver
from ..models.halting import HaltRule
from .loop import PieceNames, compose_loop
from .pieces import check_pieces, piece_files, pieces_dir

DEFAULT_OPSET = 18
#: Steps per Loop trip. On ONNX Runtime CPU one step per trip already costs within 1.0-1.15x of
#: the unrolled graph per iteration (body weights stay body initializers, so the NCHWc conv layout
#: applies inside the Loop); more sub-steps gained nothing measurable and can waste up to k-1 steps.
DEFAULT_SUBSTEPS = 1
RESERVED = {"images", "max_iters", "tol", "threshold", "patience", "iterations", "residual"}


@dataclass
class ExportResult:
    path: Path
    sidecar: Path
    strategy: str
    opset: int
    meta: ArtifactMeta
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    seconds: float
    size_bytes: int
    card: dict[str, Any] = field(default_factory=dict)
    pieces: Path | None = None  # the folder of standalone encode/step/readout graphs (export/pieces.py)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "sidecar": str(self.sidecar),
            "strategy": self.strategy,
            "opset": self.opset,
            "defaults": self.meta.budget.kwargs(),
            "inputs": self.inputs,
            "outputs": self.outputs,
            "seconds": round(self.seconds, 3),
            "size_bytes": self.size_bytes,
        }


# --- the pieces, as modules the dynamo exporter can trace -------------------------------------


class _Pieces(nn.Module):
    """Encoder, `substeps` steps and readout side by side (inputs/outputs: see loop.PieceNames);
    the readout reads its own copy of ctx so the pieces stay independent.

    The step is the solver's `advance` (models/solver.py), so iteration counts match the eager
    model; `execution` chooses a compacted (active rows only) or a masked body. With sub-steps
    the budget can end inside a trip: an active sample has run exactly as many steps as the
    trip count implies, so `iterations < max_iters` is the per-sample budget test.
    """

    def __init__(self, model: RecurrentSegmenter, spec: pytree.TreeSpec, heads: tuple[str, ...], substeps: int,
                 execution: str, rule: HaltRule = HaltRule()):
        super().__init__()
        self.m, self.spec, self.heads, self.substeps, self.execution = model, spec, heads, substeps, execution
        self.rule = rule

    def encoder(self, images: Tensor):
        ctx = self.m.encode(images)
        h = self.m.init_state(ctx)
        return (*pytree.tree_leaves(ctx), h, *solver.start(h))

    def step(self, ctx, h, active, iterations, residual, streak, tol, *rest):
        halting = None
        if self.rule.policy != "tol":  # threshold and patience are graph inputs
            halting, rest = solver.Halting(self.rule, self.m, rest[0], rest[1]), rest[2:]
        trip, max_iters = rest if rest else (None, None)
        for _ in range(self.substeps):
            if self.substeps > 1:
                active = active & (iterations < max_iters)
            h, active, iterations, residual, streak = solver.advance(
                self.m.step, ctx, h, active, iterations, residual, streak, tol, execution=self.execution,
                halting=halting,
            )
        return active.any(), h, active, iterations, residual, streak

    def forward(self, images: Tensor, *args: Tensor):
        n = self.spec.num_leaves
        ctx = pytree.tree_unflatten(list(args[:n]), self.spec)
        heads = self.m.readout(pytree.tree_unflatten(list(args[-n - 1 : -1]), self.spec), args[-1])
        return (*self.encoder(images), *self.step(ctx, *args[n : -n - 1]), *(heads[k] for k in self.heads))


class _Unrolled(nn.Module):
    """Fixed `iters` steps of the solver, one flat graph."""

    def __init__(self, model: RecurrentSegmenter, iters: int, heads: tuple[str, ...]):
        super().__init__()
        self.m, self.iters, self.heads = model, iters, heads

    def forward(self, images: Tensor):
        out = self.m.run(images, iters=self.iters)
        return tuple(out[k] for k in (*self.heads, "iterations", "residual"))


# --- helpers --------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter and its optimizer log notes (optional packages, skipped passes) that mean
    nothing to a user; real failures still raise."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _dynamo(what: str, module: nn.Module, args: tuple, inputs: list[str], outputs: list[str], dyn, opset: int):
    try:
        with _quiet_exporter():
            program = torch.onnx.export(
                module.eval(),
                args,
                dynamo=True,
                input_names=inputs,
                output_names=outputs,
                dynamic_shapes=dyn,
                opset_version=opset,
                optimize=True,
                verbose=False,
                external_data=False,
            )
    except Exception as exc:  # the exporter raises many kinds; all mean "this piece did not export"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CrbpError(f"ONNX export of the {what} failed: {first}") from exc
    return program.model_proto


def _dynamic(a: Tensor, b: Tensor, dynamic: bool):
    """Dims that differ between two traced sizes are dynamic; the rest stay static."""
    if not dynamic:
        return None
    dims = {i: torch.export.Dim.DYNAMIC for i, (x, y) in enumerate(zip(a.shape, b.shape)) if x != y}
    return dims or None


def _symbolic(a: tuple[int, ...], b: tuple[int, ...], ref_a, ref_b, dynamic: bool) -> list[int | str]:
    """Name each dim by what it tracks across two example sizes: batch, height, width or a constant."""
    if not dynamic:
        return list(a)
    names = []
    for i, (x, y) in enumerate(zip(a, b)):
        if x == y:
            names.append(int(x))
        else:
            match = [n for n, (ra, rb) in zip(("batch", "height", "width"), zip(ref_a, ref_b)) if (ra, rb) == (x, y)]
            names.append(match[0] if match else f"dim{i}")
    return names


_DTYPES = {torch.float32: ("float32", TensorProto.FLOAT), torch.int64: ("int64", TensorProto.INT64),
           torch.float16: ("float16", TensorProto.FLOAT16), torch.bool: ("bool", TensorProto.BOOL)}


def _spec(name: str, dtype: torch.dtype, shape: list[int | str], **extra) -> dict[str, Any]:
    if dtype not in _DTYPES:
        raise CrbpError(f"output {name!r} has dtype {dtype}, which the ONNX export does not handle")
    return {"name": name, "dtype": _DTYPES[dtype][0], "shape": shape, **extra}


def _value_info(spec: dict[str, Any]) -> onnx.ValueInfoProto:
    elem = {v[0]: v[1] for v in _DTYPES.values()}[spec["dtype"]]
    return helper.make_tensor_value_info(spec["name"], elem, spec["shape"])


def _check_options(model, strategy, iters, max_iters, tol, opset, fp16, example_size, substeps, path) -> tuple[int, int]:
    if not isinstance(model, RecurrentSegmenter):
        raise InputError(f"model must be a RecurrentSegmenter, got {type(model).__name__}")
    if strategy not in STRATEGIES:
        raise InputError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if strategy == "unrolled":
        if max_iters is not None or tol is not None:
            raise InputError("the unrolled strategy runs a fixed count: give iters=N, not max_iters/tol")
        if iters is None:
            raise InputError("the unrolled strategy needs iters=N (the fixed number of steps)")
        Budget(iters=iters)
    else:
        if iters is not None:
            raise InputError(
                "the loop strategy exits early: give max_iters=M and tol (or use strategy='unrolled' for iters=N)"
            )
        Budget(max_iters=max_iters, tol=tol)
    if fp16:
        from .fp16 import require_converter

        require_converter()  # before the (slow) export: one line naming the missing package
    if isinstance(opset, bool) or not isinstance(opset, int) or not 17 <= opset <= 23:
        raise InputError(f"opset must be an integer in 17..23, got {opset!r}")
    if isinstance(substeps, bool) or not isinstance(substeps, int) or not 1 <= substeps <= 16:
        raise InputError(f"substeps must be an integer in 1..16, got {substeps!r}")
    try:
        h, w = (int(v) for v in example_size)
    except (TypeError, ValueError):
        raise InputError(f"example_size must be (height, width), got {example_size!r}") from None
    if h < 4 or w < 4:  # smaller sizes could be mistaken for the batch when naming dynamic dims
        raise InputError(f"example_size must be at least 4x4, got {h}x{w}")
    if Path(path).suffix != ".onnx":
        raise InputError(f"output path must end in .onnx, got {str(path)!r}")
    return h, w


# --- the API ----------------------------------------------------------------------------------


@torch.no_grad()
def export_onnx(
    model: RecurrentSegmenter,
    path: str | os.PathLike,
    *,
    strategy: str = "loop",
    iters: int | None = None,
    max_iters: int | None = None,
    tol: float | None = None,
    opset: int = DEFAULT_OPSET,
    dynamic: bool = True,
    fp16: bool = False,
    example_size: tuple[int, int] = (64, 64),
    batch: int = 1,
    substeps: int = DEFAULT_SUBSTEPS,
    execution: str | None = None,
    source: str | None = None,
    policy: str = "tol",
    threshold: float | None = None,
    patience: int = 1,
    pieces: bool = False,
) -> ExportResult:
    """Export `model` to `path` (.onnx) plus a sidecar `path.json`; both written atomically.

    Graph input `images`: float32 N x C x H x W in [0, 1]. Outputs: the readout heads by name,
    `iterations` (int64 [N]) and `residual` (float32 [N]). `loop` also takes optional inputs
    `max_iters` (int64 scalar) and `tol` (float scalar) defaulting to the values given here.
    With `dynamic=False` the graph is fixed to `batch` x `example_size`. `execution` (loop only):
    "compact" steps only the samples still running (the batch shrinks inside the Loop; best on
    ONNX Runtime), "masked" steps every row and freezes converged ones (fixed shapes, for TensorRT).
    Default: compact, masked with `substeps` > 1 (a later sub-step could find no sample left,
    and an empty batch breaks reshapes in the step).
    `fp16`: the float math in fp16 (onnxconverter-common, extra `fp16`; see fp16.py) while `images`,
    the outputs, `tol`, the Loop's counters and the convergence test stay fp32; the metadata says
    `precision: fp16`, so backends and `verify` hold it to the fp16 tolerances.
    `policy` / `threshold` / `patience`: the halting policy the Loop body computes (models/halting.py);
    threshold and patience become graph inputs beside max_iters and tol.
    `pieces` (loop, substeps=1): also write the encoder, one step and the readout as standalone graphs in
    `path.pieces/` (export/pieces.py), for hosts that step requests themselves (runtime/stepper.py).
    """
    if strategy == "loop":
        max_iters = Budget.DEFAULT.max_iters if max_iters is None else max_iters
        tol = Budget.DEFAULT.tol if tol is None else tol
    rule = _check_policy(model, strategy, fp16, max_iters, tol, policy, threshold, patience)
    height, width = _check_options(model, strategy, iters, max_iters, tol, opset, fp16, example_size, substeps, path)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise InputError(f"batch must be a positive integer, got {batch!r}")
    execution = _check_execution(execution, substeps)
    check_pieces(pieces, strategy, substeps, dynamic)
    path = Path(path)
    check_writable(path)
    started = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        proto, meta, inputs, outputs, converted, traced = _build(
            model, strategy, iters, max_iters, tol, opset, dynamic, (height, width), batch, substeps, execution, fp16,
            rule,
        )
    finally:
        model.train(was_training)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise CrbpError(f"the exported ONNX graph failed the checker: {str(exc).strip().splitlines()[0]}") from exc
    data = proto.SerializeToString()
    from ..modelcard import model_card

    card = model_card(model, source or "in-memory model", check=False)
    sidecar = _sidecar(path, data, proto, card, meta, opset, dynamic, fp16, converted, inputs, outputs)
    extra = piece_files(path, data, *traced, meta) if pieces else []
    write_atomic([(path, data), (sidecar_path(path), sidecar_bytes(sidecar)), *extra])
    return ExportResult(path=path, sidecar=sidecar_path(path), strategy=strategy, opset=opset, meta=meta, inputs=inputs,
                        outputs=outputs, seconds=time.perf_counter() - started, size_bytes=len(data), card=card,
                        pieces=pieces_dir(path) if pieces else None)


def _converter_version() -> str:
    from importlib.metadata import version

    return f"onnxconverter-common {version('onnxconverter-common')}"


def _check_policy(model, strategy, fp16, max_iters, tol, policy, threshold, patience) -> HaltRule:
    """The halting rule to build into the Loop; refused (with the reason) where the export cannot run it."""
    rule = HaltRule(policy or "tol", threshold, patience)
    if rule.policy == "tol":
        if threshold is not None or patience != 1:
            raise InputError("the tol policy takes no threshold or patience (it stops on relative change <= tol)")
        return rule
    if strategy != "loop":
        raise InputError(f"the {rule.policy} halting policy needs strategy=loop: an unrolled graph runs a fixed count")
    if fp16:
        raise InputError(f"the {rule.policy} halting policy is not exported in fp16 (its features must stay fp32): "
                         "export it in fp32, or choose --policy tol")
    Budget(max_iters=max_iters, tol=tol, policy=rule.policy, threshold=threshold, patience=patience)
    solver.Halting.of(model, rule.policy, threshold, patience)  # e.g. learned without a halting head
    return rule


def _check_execution(execution: str | None, substeps: int) -> str:
    execution = execution or ("compact" if substeps == 1 else "masked")
    if execution not in solver.EXECUTIONS:
        raise InputError(f"execution must be one of {', '.join(solver.EXECUTIONS)}, got {execution!r}")
    if execution == "compact" and substeps > 1:
        raise InputError("a compacted Loop runs one step per trip: use substeps=1 or execution='masked'")
    return execution


def _sidecar(path: Path, data: bytes, proto, card, meta: ArtifactMeta, opset, dynamic, fp16, converted, inputs,
             outputs) -> dict[str, Any]:
    """The JSON written beside the .onnx: the model card, the interface, how it was made."""
    loop = meta.strategy == "loop"
    return {
        "format": SIDECAR_FORMAT,
        "version": SIDECAR_VERSION,
        "file": path.name,
        "sha256": hashlib.sha256(data).hexdigest(),
        "model": card,
        "strategy": meta.strategy,
        "substeps": meta.substeps if loop else None,
        "execution": meta.execution if loop else None,
        "defaults": meta.budget.kwargs(),
        "opset": opset,
        "ir_version": proto.ir_version,
        "dynamic": dynamic,
        "fp16": fp16,
        "precision": meta.precision,
        "fp16_conversion": None if converted is None else {
            "converter": _converter_version(), "keep_io_types": True, **converted.to_dict()},
        "inputs": inputs,
        "outputs": outputs,
        "heads": list(meta.heads),
        "exporter": f"torch {torch.__version__} (dynamo) + onnx {onnx.__version__}",
        "verification": None,
    }


def _loop_inputs(images_spec: dict, max_iters: int, tol: float, rule: HaltRule) -> list[dict[str, Any]]:
    """The loop graph's inputs: images, then the budget (defaults that any call may override)."""
    inputs = [
        images_spec,
        {"name": "max_iters", "dtype": "int64", "shape": [], "default": max_iters, "optional": True},
        {"name": "tol", "dtype": "float32", "shape": [], "default": float(tol), "optional": True},
    ]
    if rule.policy != "tol":
        inputs += [
            {"name": "threshold", "dtype": "float32", "shape": [], "default": float(rule.threshold), "optional": True,
             "meaning": f"the {rule.policy} halting policy's threshold"},
            {"name": "patience", "dtype": "int64", "shape": [], "default": rule.patience, "optional": True,
             "meaning": "steps in a row the policy must fire"},
        ]
    return inputs


def _examples(model, size, batch: int, dynamic: bool):
    """Two example batches whose differences are what is dynamic (dynamo needs batch >= 2 for that)."""
    mult = int(getattr(model, "stride", 1) or 1)
    h, w = size
    gen = torch.Generator().manual_seed(0)
    device = next(model.parameters(), torch.empty(0)).device
    ex_a = torch.rand(2 if dynamic else batch, model.in_channels, h, w, generator=gen).to(device)
    ex_b = torch.rand(3, model.in_channels, h + mult, w + 2 * mult, generator=gen).to(device)
    for ex in (ex_a, ex_b):
        model.check_images(ex)  # e.g. a size that is not a multiple of the model stride
    return mult, ex_a, ex_b, (ex_a.shape[0], h, w), (3, h + mult, w + 2 * mult)


def _check_parts(model, heads_a, h_a) -> tuple[str, ...]:
    """The head names, once readout and state are what the graph interface needs."""
    if not isinstance(heads_a, dict) or not heads_a:
        raise CrbpError(f"{type(model).__name__}.readout must return a non-empty dict of tensors")
    clash = sorted(RESERVED & set(heads_a))
    if clash:
        raise CrbpError(f"readout head name(s) {clash} clash with reserved graph names {sorted(RESERVED)}")
    if not isinstance(h_a, Tensor):
        raise CrbpError(f"{type(model).__name__}: the recurrent state must be one tensor, got {type(h_a).__name__}")
    return tuple(heads_a)


def _build(model, strategy, iters, max_iters, tol, opset, dynamic, size, batch, substeps, execution, fp16=False,
           rule: HaltRule = HaltRule()):
    mult, ex_a, ex_b, ref_a, ref_b = _examples(model, size, batch, dynamic)

    def parts(images):
        ctx = model.encode(images)
        h0 = model.init_state(ctx)
        h1 = model.step(ctx, h0)
        return ctx, h1, model.readout(ctx, h1)

    ctx_a, h_a, heads_a = parts(ex_a)
    ctx_b, h_b, heads_b = parts(ex_b)
    heads = _check_parts(model, heads_a, h_a)
    leaves_a, spec = pytree.tree_flatten(ctx_a)
    leaves_b = pytree.tree_leaves(ctx_b)
    ctx_names = tuple(f"ctx_{i}" for i in range(len(leaves_a)))

    images_spec = {
        "name": "images",
        "dtype": "float32",
        "shape": _symbolic(tuple(ex_a.shape), tuple(ex_b.shape), ref_a, ref_b, dynamic),
        "layout": "NCHW",
        "range": [0.0, 1.0],
        "size_multiple": mult,
    }
    outputs = [
        _spec(k, heads_a[k].dtype, _symbolic(tuple(heads_a[k].shape), tuple(heads_b[k].shape), ref_a, ref_b, dynamic))
        for k in heads
    ]
    batch_dim = images_spec["shape"][0]
    outputs += [
        _spec("iterations", torch.int64, [batch_dim], meaning="steps run per sample"),
        _spec("residual", torch.float32, [batch_dim], meaning="||h_t - h_(t-1)|| / ||h_(t-1)|| of the last step"),
    ]
    meta = ArtifactMeta(
        strategy=strategy,
        heads=heads,
        in_channels=model.in_channels,
        size_multiple=mult,
        iters=iters,
        max_iters=max_iters,
        tol=float(tol) if tol is not None else None,
        substeps=substeps if strategy == "loop" else 1,
        arch=model.arch,
        execution=execution if strategy == "loop" else "masked",
        precision="fp16" if fp16 else "fp32",
        policy=rule.policy,
        threshold=None if rule.threshold is None else float(rule.threshold),
        patience=rule.patience,
    )
    images_dyn = _dynamic(ex_a, ex_b, dynamic)
    converted, traced = None, None
    if strategy == "unrolled":
        proto = _dynamo(
            "unrolled model", _Unrolled(model, iters, heads), (ex_a.clone(),), ["images"],
            [*heads, "iterations", "residual"], (images_dyn,) if images_dyn else None, opset,
        )
        proto.graph.ClearField("output")
        proto.graph.output.extend(_value_info(o) for o in outputs)
        del proto.graph.input[:]
        proto.graph.input.append(_value_info(images_spec))
        if fp16:
            from .fp16 import convert

            proto, converted = convert(proto, ["residual"])
        inputs = [images_spec]
    else:
        proto, converted, traced = _export_loop(model, spec, heads, ctx_names, (ex_a, ex_b), (leaves_a, leaves_b), (h_a, h_b),
                                        dynamic, opset, substeps, execution, max_iters, tol, images_spec, outputs, fp16,
                                        rule)
        inputs = _loop_inputs(images_spec, max_iters, tol, rule)
    del proto.metadata_props[:]
    for key, value in meta.to_props().items():
        proto.metadata_props.add(key=key, value=value)
    proto.producer_name = "crbp-deploy"
    return proto, meta, inputs, outputs, converted, traced


def _export_loop(model, spec, heads, ctx_names, ex, leaves, hs, dynamic, opset, substeps, execution, max_iters, tol,
                 images_spec, outputs, fp16=False, rule: HaltRule = HaltRule()):
    (ex_a, ex_b), (leaves_a, leaves_b), (h_a, h_b) = ex, leaves, hs
    names = PieceNames(ctx_names, heads, substeps, halting=rule.policy != "tol")
    b = h_a.shape[0]
    # every example tensor is a fresh clone: the exporter merges inputs that are the same object
    dev = h_a.device
    args = [ex_a.clone(), *(t.clone() for t in leaves_a), h_a.clone(), torch.ones(b, dtype=torch.bool, device=dev),
            torch.zeros(b, dtype=torch.int64, device=dev), torch.full((b,), math.inf, device=dev),
            torch.zeros(b, dtype=torch.int64, device=dev), torch.tensor(float(tol), device=dev)]
    if names.halting:
        args += [torch.tensor(float(rule.threshold), device=dev), torch.tensor(int(rule.patience), device=dev)]
    if substeps > 1:
        args += [torch.tensor(0, dtype=torch.int64, device=dev), torch.tensor(max_iters, dtype=torch.int64, device=dev)]
    args += [*(t.clone() for t in leaves_a), h_a.clone()]
    dyn = None
    if dynamic:
        vec = {0: torch.export.Dim.DYNAMIC}
        ctx_dyn = [_dynamic(x, y, True) for x, y in zip(leaves_a, leaves_b)]
        h_dyn = _dynamic(h_a, h_b, True)
        rest = [*ctx_dyn, h_dyn, vec, vec, vec, vec, None] + [None] * len(names.policy_inputs)
        rest += [None, None] if substeps > 1 else []
        dyn = (_dynamic(ex_a, ex_b, True), tuple([*rest, *ctx_dyn, h_dyn]))
    pieces = _dynamo("encoder/step/readout", _Pieces(model, spec, heads, substeps, execution, rule), tuple(args),
                     names.inputs, names.outputs, dyn, opset)
    converted = None
    if fp16:  # before the Loop exists: every piece interface (state, residual, tol, ctx) stays fp32 (see fp16.py)
        from .fp16 import convert

        pieces, converted = convert(pieces, ["residual0", "residual_next"])
    try:
        return compose_loop(pieces, names, max_iters=max_iters, tol=float(tol), threshold=rule.threshold,
                            patience=rule.patience, images=_value_info(images_spec),
                            outputs=[_value_info(o) for o in outputs]), converted, (pieces, names)
    except ValueError as exc:
        raise CrbpError(f"composing the ONNX Loop failed: {exc}") from exc
