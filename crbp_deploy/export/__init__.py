"""ONNX export (fixed-count `unrolled` or early-exit `loop`) and verification against PyTorch."""
from ..artifact import STRATEGIES, ArtifactMeta, read_sidecar, sidecar_path
from .onnx_export import DEFAULT_OPSET, DEFAULT_SUBSTEPS, ExportResult, export_onnx
from .verify import VerifyReport, verify

__all__ = [
    "DEFAULT_OPSET",
    "DEFAULT_SUBSTEPS",
    "STRATEGIES",
    "ArtifactMeta",
    "ExportResult",
    "VerifyReport",
    "export_onnx",
    "read_sidecar",
    "sidecar_path",
    "verify",
]
