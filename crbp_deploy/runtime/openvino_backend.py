"""OpenVINO backend (CPU) for artifacts written by `crbp_deploy.export.export_onnx`.

OpenVINO reads our ONNX directly, the early-exit `Loop` included, and the compacted body (a batch that
shrinks inside the Loop as samples converge) runs as exported: per-sample iterations identical to
PyTorch in fp32 (tests/test_openvino.py). Its lever on this CPU is `INFERENCE_PRECISION_HINT=bf16`
(AMX): convolutions in bf16 while the CPU plugin keeps the Loop body's tail, the state update and the
residual, in fp32.

One trap handled here: OpenVINO folds a graph input that has an initializer into a constant, which
would freeze the loop budget (`max_iters`, `tol`) at its export-time default. Those initializers are
dropped from the in-memory copy before OpenVINO reads it, so every call sets its own budget.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..artifact import BUDGET_INPUTS, ArtifactMeta
from ..errors import CrbpError, InputError
from ..precision import canonical
from .base import Backend, Budget

INSTALL_HINT = "pip install 'crbp-deploy[openvino]' (or: pip install openvino==2026.4.1)"
#: our precision names -> OpenVINO's INFERENCE_PRECISION_HINT values and the CPU capability they need
_OV_PRECISION = {"fp32": ("f32", "FP32"), "bf16": ("bf16", "BF16"), "fp16": ("f16", "FP16")}


def is_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def check_installed() -> None:
    """InputError naming the missing package and how to get it (one line, exit 1 from the CLI)."""
    if not is_available():
        raise InputError(f"the openvino backend needs the `openvino` package, which is not installed: {INSTALL_HINT}")


def _core():
    check_installed()
    import openvino as ov

    return ov, ov.Core()


def capabilities(core, device: str = "CPU") -> list[str]:
    """OpenVINO's OPTIMIZATION_CAPABILITIES of `device` (e.g. FP32, BF16, FP16, INT8) on this machine."""
    return list(core.get_property(device, "OPTIMIZATION_CAPABILITIES"))


class OpenVinoBackend(Backend):
    """One compiled OpenVINO model over the whole artifact, on the CPU device.

    `precision`: fp32 | bf16 | fp16 (OpenVINO's inference precision hint; refused when this CPU lacks
    it, never silently run in another precision). `threads`: INFERENCE_NUM_THREADS (None: all cores).
    """

    name = "openvino"

    def __init__(self, onnx_path: str | os.PathLike, *, threads: int | None = None, precision: str | None = "fp32",
                 device: str = "CPU"):
        import onnx

        ov, core = _core()
        self.path = Path(onnx_path)
        if not self.path.is_file():
            raise InputError(f"{self.path}: no such ONNX file")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise InputError(f"threads must be a positive integer, got {threads!r}")
        self.precision = canonical(precision)
        if device not in core.available_devices:
            raise InputError(f"OpenVINO here has no {device} device; available: {', '.join(core.available_devices)}")
        hint, capability = _OV_PRECISION[self.precision]
        found = capabilities(core, device)
        if capability not in found:
            raise InputError(
                f"OpenVINO cannot run {self.precision} on this {device} (its capabilities: {', '.join(found)}); "
                "use --precision fp32"
            )
        try:
            proto = onnx.load(str(self.path))
        except Exception as exc:  # onnx's DecodeError and friends
            raise CrbpError(f"{self.path}: not a readable ONNX file ({type(exc).__name__})") from None
        props = {p.key: p.value for p in proto.metadata_props}
        self.adopt_artifact(ArtifactMeta.from_props(props, str(self.path)))
        kept = [t for t in proto.graph.initializer if t.name not in BUDGET_INPUTS]
        del proto.graph.initializer[:]
        proto.graph.initializer.extend(kept)
        self.threads, self.device = threads, device
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"}
        if threads is not None:
            config["INFERENCE_NUM_THREADS"] = threads
        try:
            model = core.read_model(proto.SerializeToString(), ov.Tensor(np.empty(0, dtype=np.uint8)))
            self.compiled = core.compile_model(model, device, config)
        except Exception as exc:  # OpenVINO raises RuntimeError with a multi-line trace
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise CrbpError(f"{self.path}: OpenVINO cannot compile it ({first})") from None
        got = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        got = got.get_type_name() if hasattr(got, "get_type_name") else str(got)
        if got != hint:  # belt and braces: the plugin must not have chosen another precision
            raise CrbpError(f"OpenVINO compiled {self.path.name} in {got}, not the requested {hint}")
        self.request = self.compiled.create_infer_request()
        self.input_names = [p.get_any_name() for p in self.compiled.inputs]
        self.output_names = [p.get_any_name() for p in self.compiled.outputs]
        self.version = ov.get_version()

    def describe_artifact(self) -> str:
        return f"artifact {self.path.name}"

    def _infer(self, images, budget: Budget) -> dict[str, np.ndarray]:
        if not isinstance(images, np.ndarray):
            images = images.cpu().numpy()
        feeds: dict[str, Any] = {"images": np.ascontiguousarray(images, dtype=np.float32)}
        feeds.update(self.budget_feeds(budget))
        try:
            result = self.request.infer(feeds)
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise CrbpError(f"{self.describe_artifact()}: OpenVINO failed to run it ({first})") from None
        # infer() reuses its output buffers on the next call: copy out
        out = {port.get_any_name(): np.array(value, copy=True) for port, value in result.items()}
        out["iterations"] = out["iterations"].astype(np.int64, copy=False)
        out["residual"] = out["residual"].astype(np.float32, copy=False)
        return {name: out[name] for name in self.output_names}

    def telemetry_extra(self) -> dict[str, Any]:
        return {"device": self.device, "threads": self.threads, "precision": self.precision,
                "artifact": self.path.name, "openvino": self.version}
