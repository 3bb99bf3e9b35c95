"""ONNX Runtime backend for artifacts written by `crbp_deploy.export.export_onnx`.

The artifact describes itself (`metadata_props`): strategy, heads, input channels, stride and
the budget defaults, so no sidecar is needed to run it. Loop artifacts take `max_iters` / `tol`
per call; unrolled artifacts run their fixed count and refuse other budgets.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..artifact import ArtifactMeta
from ..errors import CrbpError, InputError
from .base import Backend, Budget

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


def default_providers() -> list[str]:
    """CUDA first when this onnxruntime build has it, CPU always as the fallback."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [CUDA, CPU] if CUDA in available else [CPU]


class OrtBackend(Backend):
    """One onnxruntime session over the whole artifact (encoder, Loop or unrolled steps, readout).

    `threads` is the session's intra-op thread count (None: onnxruntime's default, all cores).
    """

    name = "onnxruntime"

    def __init__(
        self,
        onnx_path: str | os.PathLike,
        providers: Sequence[str] | None = None,
        *,
        threads: int | None = None,
        optimization: str = "all",
    ):
        import onnxruntime as ort

        self.path = Path(onnx_path)
        if not self.path.is_file():
            raise InputError(f"{self.path}: no such ONNX file")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise InputError(f"threads must be a positive integer, got {threads!r}")
        levels = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }
        if optimization not in levels:
            raise InputError(f"optimization must be one of {', '.join(levels)}, got {optimization!r}")
        available = ort.get_available_providers()
        providers = list(providers) if providers is not None else default_providers()
        missing = [p for p in providers if p not in available]
        if missing:
            raise InputError(f"onnxruntime here has no {', '.join(missing)}; available: {', '.join(available)}")
        options = ort.SessionOptions()
        options.graph_optimization_level = levels[optimization]
        # The loop defaults are graph inputs with initializers on purpose (overridable); onnxruntime
        # warns about exactly that at every session start, so only errors are logged.
        options.log_severity_level = 3
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.threads = threads
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types for bad files
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise CrbpError(f"{self.path}: onnxruntime cannot load it ({first})") from None
        self.meta = ArtifactMeta.from_props(self.session.get_modelmeta().custom_metadata_map, str(self.path))
        self.adopt_artifact(self.meta)
        # what the artifact computes in ("fp16": export --fp16); verify holds it to that precision's tolerance
        self.precision = self.meta.precision
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.input_shape = list(self.session.get_inputs()[0].shape)  # ints where the export was static

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def describe_artifact(self) -> str:
        return f"artifact {self.path.name}"

    def check_images(self, images):
        images = super().check_images(images)
        fixed = [(i, d) for i, d in enumerate(self.input_shape) if isinstance(d, int)]
        if any(images.shape[i] != d for i, d in fixed):
            shape = ["?" if not isinstance(d, int) else d for d in self.input_shape]
            raise InputError(
                f"{self.describe_artifact()} was exported for images of shape {shape} (dynamic=False), "
                f"got {list(images.shape)}"
            )
        return images

    def _infer(self, images, budget: Budget) -> dict[str, np.ndarray]:
        if not isinstance(images, np.ndarray):  # a (possibly CUDA) tensor
            images = images.cpu().numpy()
        feeds: dict[str, Any] = {"images": np.ascontiguousarray(images, dtype=np.float32)}
        feeds.update(self.budget_feeds(budget))
        try:
            values = self.session.run(self.output_names, feeds)
        except Exception as exc:  # onnxruntime's own exception types; keep its first line
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise CrbpError(f"{self.describe_artifact()}: onnxruntime failed to run it ({first})") from exc
        return dict(zip(self.output_names, values))

    def telemetry_extra(self) -> dict[str, Any]:
        return {"providers": self.providers, "threads": self.threads, "artifact": self.path.name,
                "precision": self.precision}
