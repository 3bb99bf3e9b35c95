"""TensorRT backend for engines written by `crbp_deploy.export.tensorrt.build_engine`.

Device memory comes from torch CUDA tensors (`data_ptr()`), so no pycuda is needed; one CUDA
stream and one execution context per backend, guarded by a lock (a context runs one call at a time).
Iteration counts are the graph's own `iterations` output, never inferred from how many trips
TensorRT's ILoop ran (it has been seen to run one more than other runtimes): verification compares
them per sample against PyTorch.
"""
from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..artifact import ENGINE_SUFFIXES, ArtifactMeta, read_engine_sidecar
from ..errors import CrbpError, InputError
from .base import Backend, Budget


def _import_tensorrt():
    try:
        import tensorrt as trt  # noqa: PLC0415 -- optional dependency, imported only when asked for
    except Exception as exc:  # ImportError, or OSError/RuntimeError from a broken CUDA/TensorRT install
        return None, exc
    return trt, None


def tensorrt_available() -> bool:
    """True when `import tensorrt` works and torch sees a CUDA device."""
    trt, _ = _import_tensorrt()
    if trt is None:
        return False
    return bool(torch.cuda.is_available())


def require_tensorrt():
    """The `tensorrt` module, or a CrbpError naming what is missing."""
    trt, exc = _import_tensorrt()
    if trt is None:
        detail = f" ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})" if exc else ""
        raise CrbpError(
            "TensorRT is not installed: the `tensorrt` Python package could not be imported"
            f"{detail}; install TensorRT 10 on a machine with an NVIDIA GPU, or use the onnxruntime backend"
        )
    if not torch.cuda.is_available():
        raise CrbpError("no CUDA device: TensorRT needs an NVIDIA GPU and a CUDA build of torch; use the onnxruntime backend")
    return trt


def _torch_dtypes(trt) -> dict[Any, torch.dtype]:
    pairs = [("float32", torch.float32), ("float16", torch.float16), ("bfloat16", torch.bfloat16),
             ("int32", torch.int32), ("int64", torch.int64), ("int8", torch.int8), ("uint8", torch.uint8),
             ("bool", torch.bool)]
    return {getattr(trt, name): dtype for name, dtype in pairs if hasattr(trt, name)}


class TrtBackend(Backend):
    """Runs a serialized TensorRT engine on one CUDA device (`device`: index or "cuda:N")."""

    name = "tensorrt"
    is_available = staticmethod(tensorrt_available)

    def __init__(self, engine_path: str | os.PathLike, *, device: int | str | torch.device | None = None):
        self.path = Path(engine_path)
        if self.path.suffix not in ENGINE_SUFFIXES:  # the same answer on every machine, before TensorRT is needed
            raise InputError(f"{self.path}: the TensorRT backend runs an engine ({' or '.join(ENGINE_SUFFIXES)}); "
                             "build one from an ONNX artifact with crbp_deploy.export.tensorrt.build_engine")
        trt = require_tensorrt()
        if not self.path.is_file():
            raise InputError(f"{self.path}: no such engine file")
        self.sidecar = read_engine_sidecar(self.path)
        data = self.path.read_bytes()
        if hashlib.sha256(data).hexdigest() != self.sidecar.get("sha256"):
            raise CrbpError(f"{self.path}: the engine does not match its sidecar (sha256 differs); rebuild it")
        self.meta = ArtifactMeta.from_props(self.sidecar.get("metadata_props") or {}, str(self.path))
        self.device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(
            f"cuda:{device}" if isinstance(device, int) else device)
        if self.device.type != "cuda":
            raise InputError(f"the TensorRT backend runs on a CUDA device, got {self.device}")
        self._dtypes = _torch_dtypes(trt)
        with torch.cuda.device(self.device):
            self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            self.engine = self._runtime.deserialize_cuda_engine(data)
            if self.engine is None:
                built = f"TensorRT {self.sidecar.get('tensorrt')} on {self.sidecar.get('device')}"
                here = f"TensorRT {trt.__version__} on {torch.cuda.get_device_name(self.device)}"
                raise CrbpError(f"{self.path}: TensorRT cannot load this engine (built with {built}, this is {here}); "
                                "engines are tied to one TensorRT version and GPU -- rebuild it here")
            self.context = self.engine.create_execution_context()
            if self.context is None:
                raise CrbpError(f"{self.path}: TensorRT could not create an execution context (out of GPU memory?)")
            self.stream = torch.cuda.Stream(self.device)
        self._lock = threading.Lock()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_input[n]]
        self.output_names = [n for n in names if not is_input[n]]
        self._host_io = {n for n in names if self.engine.is_shape_inference_io(n)}
        missing = [n for n in ("images",) if n not in self.input_names]
        missing += [n for n in (*self.meta.heads, "iterations", "residual") if n not in self.output_names]
        if missing:
            raise CrbpError(f"{self.path}: the engine lacks tensor(s) {missing}; it was not built from a crbp-deploy artifact")
        self.budget_inputs = all(n in self.input_names for n in ("max_iters", "tol"))  # threshold/patience: with a policy
        self.adopt_artifact(self.meta)
        lo, _, hi = (tuple(int(d) for d in s) for s in self.engine.get_tensor_profile_shape("images", 0))
        self.profile = (lo, hi)
        self.input_shape = [a if a == b else "dynamic" for a, b in zip(lo, hi)]  # ints where the engine is static

    def describe_artifact(self) -> str:
        return f"engine {self.path.name}"

    def resolve_budget(self, iters=None, max_iters=None, tol=None, **rule) -> Budget:
        budget = super().resolve_budget(iters, max_iters, tol, **rule)
        if self.strategy == "loop" and not self.budget_inputs and budget != self.default_budget:
            raise InputError(
                f"{self.describe_artifact()} was built with its budget fixed at {self.default_budget.kwargs()} "
                f"(expose_budget=False), got {budget.kwargs()}; rebuild it with expose_budget=True"
            )
        return budget

    def check_images(self, images):
        images = super().check_images(images)
        lo, hi = self.profile
        shape = tuple(images.shape)
        if any(not a <= d <= b for a, d, b in zip(lo, shape, hi)):
            raise InputError(f"{self.describe_artifact()} takes images from {list(lo)} to {list(hi)} "
                             f"(its optimization profile), got {list(shape)}")
        return images

    def _dtype(self, name: str) -> torch.dtype:
        trt_dtype = self.engine.get_tensor_dtype(name)
        if trt_dtype not in self._dtypes:
            raise CrbpError(f"{self.describe_artifact()}: tensor {name!r} has type {trt_dtype}, which crbp-deploy does not handle")
        return self._dtypes[trt_dtype]

    def _bind_scalar(self, name: str, value, keep: list) -> None:
        dtype = self._dtype(name)
        if name in self._host_io:  # shape-tensor inputs are read on the host
            host = np.array(value, dtype=torch.empty(0, dtype=dtype).numpy().dtype)
            keep.append(host)
            ok = self.context.set_tensor_address(name, host.ctypes.data)
        else:
            dev = torch.tensor(value, dtype=dtype, device=self.device)
            keep.append(dev)
            ok = self.context.set_tensor_address(name, dev.data_ptr())
        if not ok:
            raise CrbpError(f"{self.describe_artifact()}: TensorRT refused the address of input {name!r}")

    def _infer(self, images, budget: Budget) -> dict[str, np.ndarray]:
        with self._lock, torch.cuda.device(self.device):
            keep: list = []
            x = torch.as_tensor(images).to(self.device, self._dtype("images")).contiguous()
            keep.append(x)
            if not self.context.set_input_shape("images", tuple(x.shape)):
                raise InputError(f"{self.describe_artifact()} rejected input shape {list(x.shape)}")
            self.context.set_tensor_address("images", x.data_ptr())
            if self.budget_inputs:
                for name, value in self.budget_feeds(budget).items():
                    self._bind_scalar(name, value.item(), keep)
            outputs: dict[str, torch.Tensor] = {}
            for name in self.output_names:
                shape = tuple(self.context.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise CrbpError(f"{self.describe_artifact()}: TensorRT could not infer the shape of output {name!r}")
                out = torch.empty(shape, dtype=self._dtype(name), device=self.device)
                outputs[name] = out
                self.context.set_tensor_address(name, out.data_ptr())
            self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the input copy is done first
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise CrbpError(f"{self.describe_artifact()}: TensorRT failed to run it (execute_async_v3 returned False)")
            self.stream.synchronize()
        result = {name: t.cpu().numpy() for name, t in outputs.items()}
        result["iterations"] = result["iterations"].astype(np.int64, copy=False)
        result["residual"] = result["residual"].astype(np.float32, copy=False)
        return result

    def telemetry_extra(self) -> dict[str, Any]:
        return {"engine": self.path.name, "device": str(self.device), "tensorrt": self.sidecar.get("tensorrt"),
                "fp16": bool(self.sidecar.get("fp16")), "budget_inputs": self.budget_inputs}
