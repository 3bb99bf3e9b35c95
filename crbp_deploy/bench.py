"""`crbp-deploy bench`: backend x strategy x precision -> size, quality, iterations, residual, latency,
throughput and useful GFLOP/s (with the fraction of the machine's matmul peak, measured at start), in one run.

Every number of a table comes from the same process and data, so the ratios between rows are the
result (absolute times depend on the machine and its load). Quality is PQ for panoptic models
(panopticapi rules) and IoU x 100 for Pathfinder models (on mixed contour lengths), on a held-out
set (generated when no --data is given), and the same for every row of a model, up to the
runtime's float rounding.
"""
from __future__ import annotations

import csv
import io
import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import CrbpError, InputError
from .export import export_onnx
from .flops import measure_peak, step_gflop, step_profile
from .modelcard import ModelCard, resolve_budget
from .precision import torch_cpu_support
from .runtime import OrtBackend, TorchBackend
from .tasks import scorer_for, task_of

PQ_MATCH = 0.5  # a fixed count "reaches the same quality" as early exit when within this many points
FIXED_CANDIDATES = (5, 10, 15, 20, 25, 30, 40, 60, 80)  # searched for an uncalibrated model's fixed baseline


@dataclass
class Row:
    backend: str
    strategy: str
    precision: str
    budget: str
    size_mb: float
    quality: float  # PQ, or IoU x 100 (result["metric"] says which)
    mean_iterations: float
    median_residual: float  # final relative state change (fp32 in every precision)
    p50_b1_ms: float
    p90_b1_ms: float
    p50_b8_ms: float
    p90_b8_ms: float
    images_per_s: float
    gflops_b1: float  # useful GFLOP/s: step FLOPs x reported iterations / wall time (encoder, readout included)
    gflops_b8: float
    peak_fraction_b8: float  # gflops_b8 / the measured matmul peak of this row's precision


def _latency(backend, batches: list[np.ndarray], budget: dict, repeats: int,
             gflop_per_step: float = 0.0) -> tuple[float, float, float, list[float]]:
    """p50 / p90 over every batch x repeat (with early exit each image has its own cost), useful GFLOP/s
    over all timed runs, and the final residuals of the first repeat."""
    backend.run(batches[0], **budget)  # warm-up (allocations, first-run optimisations)
    times, steps, residuals = [], 0, []
    for r in range(repeats):
        for images in batches:
            t0 = time.perf_counter()
            out = backend.run(images, **budget)
            times.append((time.perf_counter() - t0) * 1e3)
            steps += int(np.sum(out["iterations"]))
            if r == 0:
                residuals += [float(v) for v in out["residual"]]
    gflops = gflop_per_step * steps / (sum(times) / 1e3) if times else 0.0
    return statistics.median(times), float(np.percentile(times, 90)), gflops, residuals


def latency_batches(stack: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The batch-1 and batch-8 latency inputs from the held-out stack. With fewer than 8 images (a small
    `--limit`), one batch of 8 repeats them: latency needs the batch size, not 8 distinct images."""
    n = len(stack)
    if n == 0:
        raise InputError("no held-out images to time: give --limit >= 1 (and --data with images in it)")
    eights = [stack[i : i + 8] for i in range(0, n - 7, 8)] or [stack[np.arange(8) % n]]
    return [stack[i : i + 1] for i in range(n)], eights


def _quality(model, backend, data: Path, budget: dict, limit: int) -> tuple[float, float]:
    scorer = scorer_for(model, data, backend=backend, limit=limit)
    res = scorer.evaluate(**budget)
    return scorer.quality(res), scorer.mean_iterations(res)


def _extra_rows(model, work: Path, early: dict, threads: int, compiled: bool, progress) -> list[tuple]:
    """Precision and compiler rows where this machine runs them: torch bf16 (autocast step), torch.compile,
    OpenVINO fp32 and bf16 on the compacted early-exit Loop. What is missing is said, not faked."""
    from .runtime import openvino_backend

    ckpt_mb = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 1e6
    rows = []
    missing = torch_cpu_support("bf16")
    if missing is None:
        rows.append(("torch eager", "early exit", TorchBackend(model, threads=threads, precision="bf16"), early, ckpt_mb))
    else:
        progress(f"no torch bf16 row: {missing}")
    if compiled:
        rows.append(("torch compiled", "early exit", TorchBackend(model, threads=threads, compile=True), early, ckpt_mb))
    if not openvino_backend.is_available():
        progress(f"no openvino rows: {openvino_backend.INSTALL_HINT}")
        return rows
    loop = export_onnx(model, work / "ov-loop.onnx", strategy="loop", execution="compact", **early)
    for precision in ("fp32", "bf16"):
        try:
            backend = openvino_backend.OpenVinoBackend(loop.path, threads=threads, precision=precision)
        except CrbpError as exc:
            progress(f"no openvino {precision} row: {exc}")
            continue
        rows.append(("openvino", "loop, early exit", backend, {}, loop.size_bytes / 1e6))
    return rows


def _best_vs(rows: list, baseline, column: str) -> dict[str, Any]:
    """The fastest row at the baseline's quality (within PQ_MATCH points) and its speed-up."""
    same = [r for r in rows if abs(r.quality - baseline.quality) <= PQ_MATCH]
    best = min(same, key=lambda r: getattr(r, column))
    return {"row": f"{best.backend} / {best.strategy} / {best.precision}",
            "speedup": round(getattr(baseline, column) / getattr(best, column), 2)}


@dataclass
class _Setup:
    """What every row of one bench shares: the model, its held-out data and latency batches, the peaks."""

    model: Any
    metric: str
    data: Path
    limit: int
    singles: list
    eights: list
    repeats: int
    gflop: float
    peak: dict
    progress: Any


def _fixed_baseline(s: _Setup, torch_backend, q_early: float) -> tuple[int, dict, str]:
    """The equal-quality fixed count early exit is timed against: `calibrate`'s in the card (`inference.calibration.
    fixed_baseline`), else the fixed count the card records (`import --iters N`: what the model runs), else
    (uncalibrated, said so) the smallest candidate within PQ_MATCH points of early exit."""
    card = ModelCard.of(s.model)
    base = (card.inference.get("calibration") or {}).get("fixed_baseline")
    if base:
        s.progress(f"fixed baseline from the card's calibration: {base['iters']} iterations "
                   f"({s.metric} {base['quality']:.2f} on the calibration data)")
        return int(base["iters"]), {}, "calibrated"
    if not card.budget.early_exit:
        s.progress(f"fixed baseline: the count the card records, {card.budget.iters} iterations")
        return int(card.budget.iters), {}, "card"
    s.progress(f"uncalibrated: the card records no fixed_baseline (`crbp-deploy calibrate` writes one); using the "
               f"smallest fixed count within {PQ_MATCH} points of early exit's {s.metric} on this data")
    fixed_quality = {}
    for n in FIXED_CANDIDATES:
        fixed_quality[n] = _quality(s.model, torch_backend, s.data, {"iters": n}, s.limit)[0]
        s.progress(f"fixed {n}: {s.metric} {fixed_quality[n]:.2f}")
        if fixed_quality[n] >= q_early - PQ_MATCH:
            return n, fixed_quality, "uncalibrated"
    return max(fixed_quality), fixed_quality, "uncalibrated"


def _row(s: _Setup, name: str, strategy: str, backend, budget: dict, mb: float) -> Row:
    """Quality, iterations, residual, latency and GFLOP/s of one backend at one budget."""
    shown = budget or backend.default_budget.kwargs()
    precision = getattr(backend, "precision", "fp32")
    quality, iters = _quality(s.model, backend, s.data, shown, s.limit)
    p50_1, p90_1, gf_1, residuals = _latency(backend, s.singles, budget, max(1, s.repeats // 4), s.gflop)
    p50_8, p90_8, gf_8, _ = _latency(backend, s.eights, budget, max(2, s.repeats // 2), s.gflop)
    fraction = gf_8 / s.peak[precision] if s.peak.get(precision) else 0.0
    s.progress(f"{name} / {strategy} / {precision}: {s.metric} {quality:.2f}, p50 b1 {p50_1:.1f} ms, b8 {p50_8:.1f} ms, "
               f"{gf_8:.1f} GFLOP/s b8")
    return Row(name, strategy, precision, json.dumps(shown), round(mb, 3), round(quality, 2), round(iters, 2),
               float(f"{statistics.median(residuals):.3g}"), round(p50_1, 2), round(p90_1, 2), round(p50_8, 2),
               round(p90_8, 2), round(8e3 / p50_8, 1), round(gf_1, 1), round(gf_8, 1), round(fraction, 4))


def _summary(rows: list[Row], peak: dict, model, image_size: tuple[int, int]) -> dict[str, Any]:
    """The speed ratios between rows, the fastest row at equal quality, the compute bound and the goals."""
    by = {(r.backend, r.strategy): r for r in rows if r.precision == "fp32"}
    t_fixed, o_unrolled = by[("torch eager", "fixed")], by[("onnxruntime", "unrolled")]
    o_loop_fixed, o_early = by[("onnxruntime", "loop, fixed")], by[("onnxruntime", "loop, early exit")]
    ratios = {
        "ort_vs_torch_same_iterations_b1": round(t_fixed.p50_b1_ms / o_unrolled.p50_b1_ms, 2),
        "ort_vs_torch_same_iterations_b8": round(t_fixed.p50_b8_ms / o_unrolled.p50_b8_ms, 2),
        "early_exit_vs_fixed_same_quality_b1": round(o_unrolled.p50_b1_ms / o_early.p50_b1_ms, 2),
        "early_exit_vs_fixed_same_quality_b8": round(o_unrolled.p50_b8_ms / o_early.p50_b8_ms, 2),
        "loop_vs_unrolled_per_iteration_b1": round(o_loop_fixed.p50_b1_ms / o_unrolled.p50_b1_ms, 2),
        "loop_vs_unrolled_per_iteration_b8": round(o_loop_fixed.p50_b8_ms / o_unrolled.p50_b8_ms, 2),
        "compact_vs_masked_early_exit_b8": round(by[("onnxruntime", "masked loop, early exit")].p50_b8_ms / o_early.p50_b8_ms, 2),
    }
    baseline = by[("torch eager", "early exit")]
    best = {f"b{b}": _best_vs(rows, baseline, f"p50_b{b}_ms") for b in (1, 8)}
    ratios["best_cpu_vs_torch_eager_fp32_b1"] = best["b1"]["speedup"]
    ratios["best_cpu_vs_torch_eager_fp32_b8"] = best["b8"]["speedup"]
    top = max(rows, key=lambda r: r.gflops_b8)
    bound = {"best_gflops_b8": top.gflops_b8, "row": f"{top.backend} / {top.strategy} / {top.precision}",
             "fraction_of_bf16_peak": round(top.gflops_b8 / peak["bf16"], 4) if peak.get("bf16") else None,
             "step_profile": [step_profile(model, p, 8, image_size) for p in peak]}
    goals = {
        "best_cpu_3x_torch_eager_fp32_b1": best["b1"]["speedup"] >= 3.0,
        "best_cpu_3x_torch_eager_fp32_b8": best["b8"]["speedup"] >= 3.0,
        "step_50pct_of_bf16_peak": bool(bound["fraction_of_bf16_peak"] and bound["fraction_of_bf16_peak"] >= 0.5),
        "ort_2x_torch": ratios["ort_vs_torch_same_iterations_b1"] >= 2.0,
        "early_exit_1.5x_fixed": ratios["early_exit_vs_fixed_same_quality_b1"] >= 1.5,
        "early_exit_1.5x_fixed_b8": ratios["early_exit_vs_fixed_same_quality_b8"] >= 1.5,
        "early_exit_b8_at_least_fixed": ratios["early_exit_vs_fixed_same_quality_b8"] >= 1.0,
        "loop_within_1.25x_unrolled": ratios["loop_vs_unrolled_per_iteration_b1"] <= 1.25,
    }
    return {"ratios": ratios, "goals_met": goals, "best_at_equal_quality": best, "compute_bound": bound}


def run_bench(model, *, data: Path | None = None, threads: int = 2, repeats: int = 10, limit: int = 48,
              size: int | None = None, workdir: Path | None = None, progress=print, compiled: bool = False) -> dict[str, Any]:
    """`size`: side of the generated held-out images (default: the size the card says the model was
    evaluated at, so a 128 px model is not benchmarked on 64 px scenes)."""
    task = task_of(model)
    size = size or ModelCard.of(model).image_size
    task.runner(model)  # a model its task cannot score (an untrained panoptic model) fails before any work
    torch.set_num_threads(threads)
    tmp = tempfile.TemporaryDirectory()
    work = Path(workdir or tmp.name)
    data = data if data is not None else task.generate(work / "data", limit, size, seed=4242)
    dataset = task.open(data)
    stack = task.images(dataset, 16)
    early = resolve_budget(model).early().kwargs()  # a fixed-count card (`import --iters N`): the default early exit
    peak = measure_peak(threads)  # first, before anything else warms the caches
    progress(f"measured matmul peak ({threads} threads): " + ", ".join(f"{k} {v} GFLOP/s" for k, v in peak.items()))
    if len(stack) < 8:
        progress(f"{len(stack)} held-out image(s): the batch-8 latency repeats them to fill the batch")
    s = _Setup(model, task.metric, data, limit, *latency_batches(stack), repeats, step_gflop(model, *stack.shape[-2:]),
               peak, progress)
    torch_backend = TorchBackend(model, threads=threads)

    # 1. early exit's quality, and the fixed count of the same quality (torch; same numbers on every runtime)
    q_early, it_early = _quality(model, torch_backend, data, early, limit)
    progress(f"early exit {early}: {task.metric} {q_early:.2f}, {it_early:.1f} iterations")
    n_fixed, fixed_quality, baseline = _fixed_baseline(s, torch_backend, q_early)
    # 2. every row: artifacts at that count and the early-exit loops, then the extra precisions and compilers
    unrolled = export_onnx(model, work / "unrolled.onnx", strategy="unrolled", iters=n_fixed)
    loop = export_onnx(model, work / "loop.onnx", strategy="loop", **early)
    masked = export_onnx(model, work / "masked.onnx", strategy="loop", execution="masked", **early)
    # a fixed count in a Loop: one without a halting policy (tol 0 stops nothing but divergence)
    plain = loop if early.get("policy", "tol") == "tol" else export_onnx(
        model, work / "loop-tol.onnx", strategy="loop", max_iters=early["max_iters"], tol=early["tol"])
    ort_loop, ckpt_mb = OrtBackend(loop.path, threads=threads), sum(t.nbytes for t in model.state_dict().values()) / 1e6
    plan = [
        ("torch eager", "fixed", torch_backend, {"iters": n_fixed}, ckpt_mb),
        ("torch eager", "early exit", torch_backend, early, ckpt_mb),
        ("onnxruntime", "unrolled", OrtBackend(unrolled.path, threads=threads), {}, unrolled.size_bytes / 1e6),
        ("onnxruntime", "loop, fixed", OrtBackend(plain.path, threads=threads), {"max_iters": n_fixed, "tol": 0.0},
         plain.size_bytes / 1e6),
        ("onnxruntime", "loop, early exit", ort_loop, {}, loop.size_bytes / 1e6),
        ("onnxruntime", "masked loop, early exit", OrtBackend(masked.path, threads=threads), {}, masked.size_bytes / 1e6),
    ]
    plan += _extra_rows(model, work, early, threads, compiled, progress)
    rows = [_row(s, *entry) for entry in plan]
    fixed_quality = fixed_quality or {n_fixed: next(r.quality for r in rows if r.strategy == "fixed")}
    summary = _summary(rows, peak, model, tuple(stack.shape[-2:]))
    tmp.cleanup()
    return {
        "metric": task.metric,
        "rows": [asdict(r) for r in rows],
        **{k: summary[k] for k in ("ratios", "goals_met", "best_at_equal_quality")},
        "peak_gflops": peak,
        "gflop_per_step": s.gflop,
        "compute_bound": summary["compute_bound"],
        "fixed_count_matching_early_exit": n_fixed,
        "fixed_baseline_source": baseline,
        "fixed_quality": fixed_quality,
        "early_exit": {"budget": early, "quality": q_early, "mean_iterations": it_early},
        "setup": {"threads": threads, "repeats": repeats, "images": min(limit, len(dataset)), "data": str(data),
                  "image_size": list(stack.shape[-2:]), "latency_images": len(s.singles), "torch": torch.__version__,
                  "arch": model.arch, "load_average": [round(v, 2) for v in os.getloadavg()]},
    }


def to_csv(result: dict) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(result["rows"][0]))
    writer.writeheader()
    writer.writerows(result["rows"])
    return buf.getvalue()


def to_markdown(result: dict) -> str:
    metric = result.get("metric", "PQ") + (" x 100" if result.get("metric") == "IoU" else "")
    head = (f"| backend | strategy | precision | budget | MB | {metric} | mean it. | residual | p50 b1 ms | p90 b1 ms | "
            "p50 b8 ms | p90 b8 ms | img/s (b8) | GFLOP/s b1 | GFLOP/s b8 | of peak b8 |\n" + "|---" * 16 + "|")
    lines = [head] + [
        f"| {r['backend']} | {r['strategy']} | {r['precision']} | `{r['budget']}` | {r['size_mb']} | {r['quality']} | "
        f"{r['mean_iterations']} | {r['median_residual']} | {r['p50_b1_ms']} | {r['p90_b1_ms']} | {r['p50_b8_ms']} | "
        f"{r['p90_b8_ms']} | {r['images_per_s']} | {r['gflops_b1']} | {r['gflops_b8']} | {100 * r['peak_fraction_b8']:.1f}% |"
        for r in result["rows"]
    ]
    return "\n".join(lines)
