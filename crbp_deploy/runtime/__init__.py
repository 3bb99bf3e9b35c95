"""One `Backend` interface over every runtime: PyTorch (eager / compiled), ONNX Runtime (CPU / CUDA), OpenVINO
(CPU), TensorRT."""
from __future__ import annotations

import os
from typing import Any

from ..errors import InputError
from ..precision import canonical
from .base import DEFAULT_MAX_ITERS, DEFAULT_TOL, Backend, Budget, RunResult
from .ort_backend import OrtBackend, default_providers
from .torch_backend import TorchBackend

KINDS = ("auto", "torch", "onnxruntime", "openvino", "tensorrt")
ALIASES = {"ort": "onnxruntime", "trt": "tensorrt", "ov": "openvino"}


def load_backend(spec: Any, kind: str = "auto", **options: Any) -> Backend:
    """A backend for `spec`: a model object, or anything `crbp_deploy.sources.resolve` names (a
    checkpoint, a bundled model or a registered architecture run on torch; an `.onnx` artifact; an engine).

    `kind` forces the runtime ("torch", "onnxruntime", "openvino", "tensorrt"; "ort", "ov", "trt" are
    aliases); `options` go to the backend's constructor (e.g. `threads=2`, `providers=[...]`,
    `precision="bf16"`). A runtime that is not installed, or a precision it cannot run here, is an
    InputError naming what is missing: never a silent fallback to another backend.
    """
    from ..models import RecurrentSegmenter
    from ..sources import CHECKPOINT_SUFFIXES, resolve

    kind = ALIASES.get(kind, kind)
    if kind not in KINDS:
        raise InputError(f"unknown backend kind {kind!r}; use one of {', '.join(KINDS)}")
    if isinstance(spec, RecurrentSegmenter):
        if kind not in ("auto", "torch"):
            raise InputError(f"a model object runs on the torch backend, not {kind}; export it to ONNX first")
        return TorchBackend(spec, **options)
    if not isinstance(spec, (str, os.PathLike)):
        raise InputError(f"cannot make a backend from {type(spec).__name__}; give a model, a .pt or an .onnx path")
    source = resolve(spec)
    if source.kind == "engine" or kind == "tensorrt":
        if kind not in ("auto", "tensorrt"):
            raise InputError(f"{source.path} is a TensorRT engine; it runs on tensorrt, not {kind}")
        from .trt_backend import TrtBackend  # imports tensorrt only when an engine is asked for

        return TrtBackend(source.path, **options)
    if source.kind == "onnx":
        if kind == "openvino":
            from .openvino_backend import OpenVinoBackend  # imports openvino only when asked for

            return OpenVinoBackend(source.path, **options)
        if kind not in ("auto", "onnxruntime"):
            raise InputError(f"{source.path} is an ONNX artifact; it runs on onnxruntime or openvino, not {kind}")
        precision = canonical(options.pop("precision", None))
        if precision == "bf16":
            raise InputError("the onnxruntime backend runs fp32 artifacts here; use --backend openvino for bf16")
        backend = OrtBackend(source.path, **options)  # runs in the artifact's own precision (fp16: export --fp16)
        if precision == "fp16" and backend.precision != "fp16":
            raise InputError(f"{source.path} is an fp32 artifact; for fp16 on onnxruntime export it with --fp16")
        return backend
    if source.kind == "checkpoint" and not source.path.name.endswith(CHECKPOINT_SUFFIXES):
        raise InputError(f"{source.path}: unknown artifact type {source.path.suffix or '(no suffix)'}; expected "
                         f".onnx or a checkpoint ({', '.join(CHECKPOINT_SUFFIXES)})")
    if kind not in ("auto", "torch"):
        raise InputError(f"{source.label} is a checkpoint; it runs on torch (export it for {kind})")
    return TorchBackend(source.load_model(), **options)


__all__ = [
    "DEFAULT_MAX_ITERS",
    "DEFAULT_TOL",
    "Backend",
    "Budget",
    "OrtBackend",
    "RunResult",
    "TorchBackend",
    "default_providers",
    "load_backend",
]
