"""docs/halting.md: does the shipped halting policy pay? Measured on held-out scenes of a seed never used for
calibration, against the smallest fixed count within 0.5 points of the best fixed count and the per-image oracle.

    OMP_NUM_THREADS=2 python benchmarks/halting_report.py [--model crbp-panoptic] [--count 96] [--seed 103]

1. `crbp_deploy.calibrate.calibrate` on the new scenes (the model's own head; nothing re-chosen): every fixed
   count, every policy's frontier and the oracle on these images.
2. The shipped budget (the card's) scored on the same trace and re-run end to end by the task's evaluator.
3. Wall-clock per image at batch 1 and 8: PyTorch eager (shipped budget vs the fixed baseline) and ONNX Runtime
   (the compacted Loop with the shipped policy vs the unrolled fixed-count graph), best of `--repeats`, one run.
Goals (issue 18): steps <= baseline / 1.5 with quality within 0.5; >= 1.4x wall-clock at batch 1 and 8 in both
runtimes; saving captured >= 0.6. Also the policy against the fixed-count curve at its own mean steps
(`quality_vs_equal_steps`). Everything goes to docs/halting_<model>.json. `--timing-only` re-times
step 3 into an existing record (the trace is the slow part; timing wants a quiet machine).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def wall_clock(model, stack: np.ndarray, shipped: dict, fixed: int, threads: int, repeats: int) -> dict:
    from crbp_deploy.calibrate import race
    from crbp_deploy.export import export_onnx
    from crbp_deploy.runtime import OrtBackend, TorchBackend

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        size = tuple(stack.shape[-2:])
        loop = export_onnx(model, Path(tmp) / "loop.onnx", example_size=size, **shipped)
        unrolled = export_onnx(model, Path(tmp) / "unrolled.onnx", strategy="unrolled", iters=fixed, example_size=size)
        eager = TorchBackend(model, threads=threads)
        runtimes = {
            "torch eager": {"policy": (eager, shipped), "fixed": (eager, {"iters": fixed})},
            "onnxruntime": {"policy": (OrtBackend(loop.path, threads=threads), {}),
                            "fixed": (OrtBackend(unrolled.path, threads=threads), {})},
        }
        for name, arms in runtimes.items():
            for b in (1, 8):
                t = race(arms, stack, b, repeats)
                out[f"{name} b{b}"] = {"policy_ms": t["policy"], "fixed_ms": t["fixed"],
                                       "speedup": round(t["fixed"] / t["policy"], 2)}
                print(f"{name} batch {b}: policy {t['policy']} ms/image, fixed {fixed}: {t['fixed']} ms/image", flush=True)
    return out


def fixed_at_steps(rec: dict, steps: float) -> dict | None:
    """The fixed-count curve at `steps` mean steps, linear between the two fixed counts around it: what a fixed
    count costing the policy's steps would score. The baseline within 0.5 of the best can sit far up a noisy
    plateau; this is the comparison at equal compute."""
    fixed = {p["budget"]["iters"]: p["quality"] for p in rec["sweep"] if "iters" in p["budget"]}
    lo = max((n for n in fixed if n <= steps), default=None)
    hi = min((n for n in fixed if n >= steps), default=None)
    if lo is None or hi is None:
        return None
    w = 0.0 if hi == lo else (steps - lo) / (hi - lo)
    return {"iters": round(steps, 4), "quality": round((1 - w) * fixed[lo] + w * fixed[hi], 4), "between": [lo, hi]}


def goals(result: dict) -> dict:
    """Issue 18's goals against the fixed baseline, and the policy against a fixed count at its own mean steps."""
    rec, base = result["calibration_on_these_images"], result["fixed_baseline"]
    q, steps = (result["shipped_point"]["end_to_end"][k] for k in ("quality", "mean_iterations"))
    out = {
        "steps_ratio": round(base["mean_iterations"] / steps, 3),
        "quality_delta": round(q - base["quality"], 3),
        "saving_captured": round((base["mean_iterations"] - steps) / (base["mean_iterations"] - rec["oracle"]["mean_iterations"]), 3),
    }
    equal = fixed_at_steps(rec, steps)
    if equal:
        out["fixed_at_equal_steps"] = equal
        out["quality_vs_equal_steps"] = round(q - equal["quality"], 3)
    return out


def measure(model, data: Path, threads: int, repeats: int) -> dict:
    from crbp_deploy import calibrate as cal
    from crbp_deploy.modelcard import ModelCard
    from crbp_deploy.tasks import scorer_for, task_of

    card = ModelCard.of(model)
    shipped = card.budget.kwargs()
    cap = cal.default_max_iters(model, None)  # the calibration's cap: the shipped one may be a swept fraction of it
    rec = cal.calibrate(model, data, max_iters=cap, latency=False, check=False, progress=print)
    point = next((p for p in rec["sweep"] if p["budget"] == shipped), None)
    scorer = scorer_for(model, data)
    end_to_end = scorer.evaluate(**shipped)
    q, steps = scorer.quality(end_to_end), scorer.mean_iterations(end_to_end)
    base = rec["fixed_baseline"]
    result = {
        "model": model.arch, "shipped": shipped, "data": str(data), "images": rec["images"],
        "calibration_on_these_images": rec,
        "shipped_point": {"trace": point, "end_to_end": {"quality": round(q, 4), "mean_iterations": round(steps, 4)}},
        "fixed_baseline": base, "best_fixed": rec["best_quality"], "oracle": rec["oracle"],
    }
    if base:
        result["goals"] = goals(result)
        stack = task_of(model).images(task_of(model).open(data), 16)
        result["wall_clock"] = wall_clock(model, stack, shipped, base["iters"], threads, repeats)
    return result


def main(argv: list[str] | None = None) -> int:
    from crbp_deploy.sources import resolve_model
    from crbp_deploy.tasks import task_of

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="crbp-panoptic")
    ap.add_argument("--data", type=Path, help="held-out data (default: generated with --seed at the card's size)")
    ap.add_argument("--count", type=int, default=96)
    ap.add_argument("--seed", type=int, default=103)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--timing-only", action="store_true", help="re-time the shipped budget against the fixed baseline "
                    "recorded in --out (e.g. on a quieter machine) and re-derive its goals; the trace is kept")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, source = resolve_model(args.model)
    task = task_of(model)
    from crbp_deploy.modelcard import ModelCard

    size = ModelCard.of(model).image_size
    data = args.data or _held_out(task, ROOT / "runs" / f"halting_eval_{args.model}_{args.seed}", args.count, size,
                                  args.seed)
    out = args.out or ROOT / "docs" / f"halting_{args.model}.json"
    if args.timing_only:
        result = json.loads(out.read_text())
        if result.get("fixed_baseline"):
            result["goals"] = goals(result)
        stack = task.images(task.open(data), 16)
        result["wall_clock"] = wall_clock(model, stack, result["shipped"], result["fixed_baseline"]["iters"],
                                          args.threads, args.repeats)
    else:
        result = measure(model, data, args.threads, args.repeats)
    result["command"] = "python benchmarks/halting_report.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    result["setup"] = {"threads": args.threads, "torch": torch.__version__, "cpu": _cpu(),
                       "load_average": [round(v, 2) for v in os.getloadavg()], "source": source}
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result.get(k) for k in ("shipped", "fixed_baseline", "oracle", "goals", "wall_clock")}, indent=1))
    return 0


def _held_out(task, folder: Path, count: int, size: int, seed: int) -> Path:
    """The generated held-out set: reused when an earlier run wrote it (same seed, same images)."""
    from crbp_deploy.errors import InputError

    try:
        task.open(folder)
        return folder
    except InputError:
        return task.generate(folder, count, size, seed)


def _cpu() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
