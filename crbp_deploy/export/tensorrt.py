"""TensorRT engines from crbp-deploy ONNX artifacts: optimization profiles, fp16, atomic writes.

Two steps, so everything but the build itself runs (and is tested) without TensorRT or a GPU:

- `plan_engine` validates the options, prepares the graph and lints it for TensorRT;
- `build_engine` parses the prepared graph with TensorRT's ONNX parser, builds and writes
  `<name>.engine` plus a JSON sidecar `<name>.engine.json` (what the runtime needs: the artifact
  metadata, the profile, the budget inputs, the TensorRT version and GPU it was built on).

Budget inputs. onnx-tensorrt parses a graph input that has an initializer as a constant
(`ModelImporter.cpp`, importInputs: "Initializers are not really network inputs"), so a Loop
artifact's `max_iters` / `tol` defaults would be frozen into the engine. With `expose_budget=True`
(the default) the plan drops those initializers so the engine takes a budget per call, and feeds
`max_iters` as INT32 (a Cast to INT64 follows in the graph): TensorRT's loop trip limit is a 0D
INT32 tensor, so the value crosses the engine boundary in the type it is used in, and an INT32
shape-tensor input (should TensorRT treat the trip limit as one) has the long-supported profile API.
The iteration bookkeeping itself stays in the graph: counts come from the graph's `iterations`
output, whatever number of trips TensorRT's ILoop runs.

Engines are specific to the TensorRT version and GPU that built them; the sidecar records both.
"""
from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import onnx
from onnx import GraphProto, TensorProto, helper

from ..errors import CrbpError, InputError
from ..models import MAX_ITERATIONS
from ..artifact import BUDGET_INPUTS, ENGINE_FORMAT, ENGINE_VERSION, ArtifactMeta, check_writable, read_sidecar
from ..artifact import ENGINE_SUFFIXES, read_engine_sidecar, sidecar_bytes, sidecar_path, write_atomic  # noqa: F401
from ..runtime.trt_backend import require_tensorrt, tensorrt_available  # noqa: F401  (re-exported)
from .trt_lint import LintReport, lint_tensorrt

DEFAULT_WORKSPACE_MB = 1024
_MAX_ITERS_INT64 = "max_iters/int64"


# --- planning (no TensorRT needed) -------------------------------------------------------------


@dataclass
class EnginePlan:
    """Everything `build_engine` hands to TensorRT, checked and prepared."""

    onnx_path: Path
    engine_path: Path
    model: onnx.ModelProto  # the prepared graph
    meta: ArtifactMeta
    shapes: dict[str, tuple[int, ...]]  # min / opt / max of `images`
    budget_inputs: bool
    max_iters_profile: tuple[int, int, int] | None  # min / opt / max, used if TensorRT makes it a shape input
    fp16: bool
    workspace_mb: int
    lint: LintReport
    source_sha256: str
    source_sidecar: dict[str, Any] | None = None

    def profile(self) -> dict[str, Any]:
        out: dict[str, Any] = {"images": {k: list(v) for k, v in self.shapes.items()}}
        if self.max_iters_profile is not None:
            out["max_iters"] = dict(zip(("min", "opt", "max"), self.max_iters_profile))
        return out


@dataclass
class EngineResult:
    path: Path
    sidecar: Path
    seconds: float
    size_bytes: int
    fp16: bool
    profile: dict[str, Any]
    budget_inputs: bool
    tensorrt: str
    device: str
    lint: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "sidecar": str(self.sidecar), "seconds": round(self.seconds, 3),
                "size_bytes": self.size_bytes, "fp16": self.fp16, "profile": self.profile,
                "budget_inputs": self.budget_inputs, "tensorrt": self.tensorrt, "device": self.device,
                "lint": self.lint}


def _shape(name: str, value: Any) -> tuple[int, ...]:
    try:
        shape = tuple(value)
    except TypeError:
        raise InputError(f"{name} must be a sequence of 4 integers (N, C, H, W), got {value!r}") from None
    if len(shape) != 4 or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
        raise InputError(f"{name} must be 4 positive integers (N, C, H, W), got {value!r}")
    return shape


def _input_dims(model: onnx.ModelProto, name: str) -> list[int | str]:
    for vi in model.graph.input:
        if vi.name == name:
            return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in vi.type.tensor_type.shape.dim]
    raise CrbpError(f"the ONNX graph has no input {name!r}")


def _profile_shapes(dims: list[int | str], meta: ArtifactMeta, min_shape, opt_shape, max_shape) -> dict[str, tuple[int, ...]]:
    given = {"min_shape": min_shape, "opt_shape": opt_shape, "max_shape": max_shape}
    if len(dims) != 4:
        raise CrbpError(f"the ONNX input 'images' has rank {len(dims)}; expected N x C x H x W")
    static = all(isinstance(d, int) and d > 0 for d in dims)
    if all(v is None for v in given.values()):
        if not static:
            raise InputError(
                f"the ONNX input 'images' is dynamic (shape {dims}): give min_shape, opt_shape and max_shape "
                "(N, C, H, W) for the TensorRT optimization profile"
            )
        given = {k: tuple(dims) for k in given}
    missing = [k for k, v in given.items() if v is None]
    if missing:
        raise InputError(f"give all of min_shape, opt_shape and max_shape (missing {', '.join(missing)})")
    shapes = {k.split("_")[0]: _shape(k, v) for k, v in given.items()}
    for key, shape in shapes.items():
        if shape[1] != meta.in_channels:
            raise InputError(f"{key}_shape has {shape[1]} channels; the model takes {meta.in_channels}")
        for axis, (d, want) in enumerate(zip(shape, dims)):
            if isinstance(want, int) and want > 0 and d != want:
                raise InputError(f"{key}_shape {list(shape)} does not fit the ONNX input 'images' {dims} (axis {axis})")
        if shape[2] % meta.size_multiple or shape[3] % meta.size_multiple:
            raise InputError(f"{key}_shape {list(shape)}: height and width must be multiples of the model stride "
                             f"{meta.size_multiple}")
    lo, mid, hi = shapes["min"], shapes["opt"], shapes["max"]
    if not all(a <= b <= c for a, b, c in zip(lo, mid, hi)):
        raise InputError(f"need min_shape <= opt_shape <= max_shape in every axis, got {list(lo)}, {list(mid)}, {list(hi)}")
    return shapes


def _rename_uses(graph: GraphProto, old: str, new: str) -> None:
    """Point every use of `old` (also inside subgraphs, which read it from the outer scope) at `new`."""
    for node in graph.node:
        node.input[:] = [new if i == old else i for i in node.input]
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _rename_uses(attr.g, old, new)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    _rename_uses(g, old, new)


def prepare_for_tensorrt(model: onnx.ModelProto, expose_budget: bool = True) -> onnx.ModelProto:
    """A copy of a loop artifact with `max_iters` (INT32) and `tol` as real inputs (see the module doc);
    other artifacts, or `expose_budget=False`, come back unchanged."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    names = {vi.name for vi in graph.input}
    if not expose_budget or not {"max_iters", "tol"} <= names:
        return out
    kept = [t for t in graph.initializer if t.name not in BUDGET_INPUTS]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    for vi in graph.input:
        if vi.name == "max_iters":
            vi.type.tensor_type.elem_type = TensorProto.INT32
    _rename_uses(graph, "max_iters", _MAX_ITERS_INT64)
    graph.node.insert(0, helper.make_node("Cast", ["max_iters"], [_MAX_ITERS_INT64], name="budget/max_iters_to_int64",
                                          to=TensorProto.INT64))
    return out


def plan_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    *,
    fp16: bool = False,
    min_shape: Sequence[int] | None = None,
    opt_shape: Sequence[int] | None = None,
    max_shape: Sequence[int] | None = None,
    workspace_mb: int = DEFAULT_WORKSPACE_MB,
    expose_budget: bool = True,
    lint: bool = True,
) -> EnginePlan:
    """Validate the options and prepare the graph; raises before any (slow) TensorRT work.

    Lint errors raise CrbpError (with `.report`); `lint=False` skips the lint.
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise InputError(f"{onnx_path}: no such ONNX file")
    if engine_path.suffix not in ENGINE_SUFFIXES:
        raise InputError(f"engine path must end in {' or '.join(ENGINE_SUFFIXES)}, got {str(engine_path)!r}")
    if isinstance(workspace_mb, bool) or not isinstance(workspace_mb, int) or workspace_mb < 1:
        raise InputError(f"workspace_mb must be a positive integer (MiB), got {workspace_mb!r}")
    if not isinstance(fp16, bool):
        raise InputError(f"fp16 must be True or False, got {fp16!r}")
    check_writable(engine_path)
    data = onnx_path.read_bytes()
    try:
        model = onnx.load_from_string(data)
    except Exception as exc:  # protobuf decode errors
        raise CrbpError(f"{onnx_path}: not a readable ONNX model ({exc})") from None
    meta = ArtifactMeta.from_props({p.key: p.value for p in model.metadata_props}, str(onnx_path))
    shapes = _profile_shapes(_input_dims(model, "images"), meta, min_shape, opt_shape, max_shape)
    prepared = prepare_for_tensorrt(model, expose_budget)
    budget_inputs = meta.strategy == "loop" and expose_budget
    report = lint_tensorrt(prepared)
    if lint and not report.ok:
        error = CrbpError(f"{onnx_path.name} is not TensorRT-compatible:\n{report.summary()}")
        error.report = report
        raise error
    max_iters_profile = None
    if budget_inputs:
        default = int(meta.max_iters or 1)
        max_iters_profile = (1, min(max(default, 1), MAX_ITERATIONS), MAX_ITERATIONS)
    return EnginePlan(
        onnx_path=onnx_path, engine_path=engine_path, model=prepared, meta=meta, shapes=shapes,
        budget_inputs=budget_inputs, max_iters_profile=max_iters_profile, fp16=fp16, workspace_mb=workspace_mb,
        lint=report, source_sha256=hashlib.sha256(data).hexdigest(), source_sidecar=read_sidecar(onnx_path),
    )


# --- the build ----------------------------------------------------------------------------------


def engine_shapes(model, size: tuple[int, int], batch: int, dynamic: bool) -> dict[str, tuple[int, ...]]:
    """The optimization profile `export --format tensorrt` builds: from batch 1 at 8 x stride px, best at the
    example size and batch, up to 4x the size and batch 8 (a static export: none, its graph fixes the shape)."""
    if not dynamic:
        return {}
    (h, w), c, s = size, model.in_channels, int(getattr(model, "stride", 1) or 1)
    return {"min_shape": (1, c, 8 * s, 8 * s), "opt_shape": (batch, c, h, w), "max_shape": (max(8, batch), c, 4 * h, 4 * w)}


def build_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    *,
    fp16: bool = False,
    min_shape: Sequence[int] | None = None,
    opt_shape: Sequence[int] | None = None,
    max_shape: Sequence[int] | None = None,
    workspace_mb: int = DEFAULT_WORKSPACE_MB,
    expose_budget: bool = True,
    lint: bool = True,
    tf32: bool = False,
    verbose: bool = False,
) -> EngineResult:
    """Build a TensorRT engine from a crbp-deploy ONNX artifact; write it and its sidecar atomically.

    `min/opt/max_shape` (N, C, H, W) form the optimization profile of `images` (required when the
    ONNX input is dynamic); `fp16` lets TensorRT pick FP16 kernels (I/O stays FP32); `tf32`
    allows TF32 math, which TensorRT enables by default on Ampere and newer -- off here, so an FP32
    engine computes residuals like the other runtimes and stops each sample after the same number
    of steps; `workspace_mb` caps the builder's scratch memory.
    """
    trt = require_tensorrt()
    import torch

    plan = plan_engine(onnx_path, engine_path, fp16=fp16, min_shape=min_shape, opt_shape=opt_shape,
                       max_shape=max_shape, workspace_mb=workspace_mb, expose_budget=expose_budget, lint=lint)
    started = time.perf_counter()
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # TensorRT 10: networks are always explicit-batch; the EXPLICIT_BATCH flag is deprecated and ignored.
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(plan.model.SerializeToString()):
        problems = [_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
        raise CrbpError(f"TensorRT's ONNX parser rejected {plan.onnx_path.name}: " + "; ".join(problems or ["no detail"]))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_mb * 2**20)
    if not tf32 and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    if plan.fp16:
        if not getattr(builder, "platform_has_fast_fp16", True):
            raise InputError("fp16 was asked for, but this GPU has no fast FP16 support")
        config.set_flag(trt.BuilderFlag.FP16)
    config.add_optimization_profile(_optimization_profile(builder, network, plan))
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise CrbpError(f"TensorRT could not build an engine from {plan.onnx_path.name} (its log above says why)")
    data = bytes(serialized)
    device = torch.cuda.get_device_name()
    capability = ".".join(str(v) for v in torch.cuda.get_device_capability())
    sidecar = {
        "format": ENGINE_FORMAT,
        "version": ENGINE_VERSION,
        "file": plan.engine_path.name,
        "sha256": hashlib.sha256(data).hexdigest(),
        "source": {"file": plan.onnx_path.name, "sha256": plan.source_sha256},
        "metadata_props": plan.meta.to_props(),
        "strategy": plan.meta.strategy,
        "heads": list(plan.meta.heads),
        "budget_inputs": plan.budget_inputs,
        "defaults": plan.meta.budget.kwargs(),
        "fp16": plan.fp16,
        "tf32": bool(tf32),
        "workspace_mb": plan.workspace_mb,
        "profile": plan.profile(),
        "io": _network_io(network),
        "tensorrt": trt.__version__,
        "device": device,
        "compute_capability": capability,
        "lint": plan.lint.to_dict(),
        "model": (plan.source_sidecar or {}).get("model"),
        "build_seconds": round(time.perf_counter() - started, 3),
        "verification": None,
    }
    write_atomic([(plan.engine_path, data), (sidecar_path(plan.engine_path), sidecar_bytes(sidecar))])
    return EngineResult(path=plan.engine_path, sidecar=sidecar_path(plan.engine_path),
                        seconds=time.perf_counter() - started, size_bytes=len(data), fp16=plan.fp16,
                        profile=plan.profile(), budget_inputs=plan.budget_inputs, tensorrt=trt.__version__,
                        device=device, lint=plan.lint.to_dict())


def _optimization_profile(builder, network, plan: EnginePlan):
    """min/opt/max for `images`; value bounds for `max_iters` if TensorRT made it a shape tensor."""
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        name = tensor.name
        if tensor.is_shape_tensor:
            if name != "max_iters" or plan.max_iters_profile is None:
                raise CrbpError(f"TensorRT treats input {name!r} as a shape tensor; crbp-deploy has no profile for it")
            lo, opt, hi = plan.max_iters_profile
            profile.set_shape_input(name, [lo], [opt], [hi])  # a 0D shape tensor holds one value
        elif name == "images":
            profile.set_shape(name, plan.shapes["min"], plan.shapes["opt"], plan.shapes["max"])
        elif any(d < 0 for d in tuple(tensor.shape)):
            raise CrbpError(f"input {name!r} has dynamic shape {tuple(tensor.shape)}; crbp-deploy has no profile for it")
    return profile


def _network_io(network) -> list[dict[str, Any]]:
    io = []
    for kind, count, get in (("input", network.num_inputs, network.get_input),
                             ("output", network.num_outputs, network.get_output)):
        for i in range(count):
            t = get(i)
            io.append({"name": t.name, "mode": kind, "dtype": str(t.dtype).split(".")[-1],
                       "shape": [int(d) for d in tuple(t.shape)], "shape_tensor": bool(t.is_shape_tensor)})
    return io


def _parser_error(error) -> str:
    parts = [str(error.desc())]
    for attr in ("node_name", "node_operator"):
        getter = getattr(error, attr, None)
        if callable(getter) and getter():
            parts.append(f"{attr.split('_')[1]}={getter()}")
    return " ".join(parts)
