"""CLI commands of this capability (placeholders until it is built)."""
from . import stub


def register(app) -> None:
    stub(app, "export", 5, "Export to ONNX / TensorRT.")
    stub(app, "verify", 5, "Verify an exported artifact against PyTorch.")
    stub(app, "bench", 5, "Benchmark backends and strategies.")
