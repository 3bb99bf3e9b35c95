"""ONNX export (fixed-count `unrolled` or early-exit `loop`) and verification against PyTorch."""
from .onnx_export import (
    DEFAULT_MAX_ITERS,
    DEFAULT_OPSET,
    DEFAULT_SUBSTEPS,
    DEFAULT_TOL,
    STRATEGIES,
    ArtifactMeta,
    ExportResult,
    export_onnx,
    read_sidecar,
    sidecar_path,
)
from .verify import VerifyReport, verify

__all__ = [
    "DEFAULT_MAX_ITERS",
    "DEFAULT_OPSET",
    "DEFAULT_SUBSTEPS",
    "DEFAULT_TOL",
    "STRATEGIES",
    "ArtifactMeta",
    "ExportResult",
    "VerifyReport",
    "export_onnx",
    "read_sidecar",
    "sidecar_path",
    "verify",
]
