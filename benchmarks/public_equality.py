"""Issue 24: how close this project's export of a public-code checkpoint is to the public forward.

Exports tests/data/public_hgru's checkpoint (the public file as it is) unrolled at the public 6 steps and as the
early-exit Loop, runs both in ONNX Runtime (and the model in PyTorch) at batch 1 on the reference inputs, and
prints max |ours - public| / max |public| per input, plus early exit's iterations. Usage:

    python benchmarks/public_equality.py
"""
from __future__ import annotations

import tarfile
import tempfile
from pathlib import Path

import numpy as np
import torch

from crbp_deploy import checkpoint
from crbp_deploy.export import export_onnx
from crbp_deploy.runtime import load_backend

DATA = Path(__file__).resolve().parent.parent / "tests" / "data" / "public_hgru"


def max_rel(got, ref) -> float:
    return float(np.abs(np.asarray(got, np.float64) - ref).max() / np.abs(ref).max())


def main() -> None:
    torch.set_num_threads(1)
    inputs, public = np.load(DATA / "inputs.npz"), np.load(DATA / "public_logits.npz")
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(DATA / "checkpoints.tar.xz") as tar:
            tar.extractall(tmp, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))  # 3.11.4+
        model = checkpoint.load(Path(tmp) / "model_fscore_0000_epoch_00_checkpoint.pth.tar")
        unrolled = load_backend(export_onnx(model, Path(tmp) / "u.onnx", strategy="unrolled", iters=6).path,
                                "onnxruntime", threads=1)
        loop = load_backend(export_onnx(model, Path(tmp) / "l.onnx", strategy="loop", max_iters=60, tol=1e-3).path,
                            "onnxruntime", threads=1)
        print("| input | steps | ONNX Runtime unrolled | ONNX Runtime Loop | PyTorch | early exit (tol 1e-2): iterations |")
        print("|---|---|---|---|---|---|")
        for name in inputs.files:
            x = (inputs[name].astype(np.float32) / 255)[None, None]
            with torch.no_grad():
                eager = model(torch.from_numpy(x), iters=6)["logits"].numpy()
            early = loop.run(x, max_iters=200, tol=1e-2)["iterations"].item()
            print(f"| {name} | 6 | {max_rel(unrolled.run(x)['logits'], public[name]):.2e} | "
                  f"{max_rel(loop.run(x, max_iters=6, tol=0.0)['logits'], public[name]):.2e} | "
                  f"{max_rel(eager, public[name]):.2e} | {early} |")
        x = (inputs["pathfinder64"].astype(np.float32) / 255)[None, None]
        got = loop.run(x, max_iters=60, tol=0.0)["logits"]
        print(f"| pathfinder64 | 60 | - | {max_rel(got, public['pathfinder64_t60']):.2e} | - | - |")


if __name__ == "__main__":
    main()
