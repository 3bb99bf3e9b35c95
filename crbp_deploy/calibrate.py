"""Calibrate a model's inference budget on held-out data (`crbp-deploy calibrate`): the frontier of
quality against steps for every halting policy, the per-image oracle, and the choice.

One trace (`frontier.trace_split`) runs each held-out image to the cap and decodes its answer after
every step, so every budget -- fixed counts, the `tol` rule, and each policy of `models/halting.py` over
its thresholds and patiences -- is scored from the same images without rerunning the model. Quality is
PQ (panoptic) or IoU x 100 (Pathfinder), in points. The choice:

- the equal-quality fixed baseline: the smallest fixed count within `max_drop` of the best fixed count;
- the budget: the early-exit budget (any policy, at the cap or at its half or quarter) with the fewest mean
  steps whose quality is within `max_drop` of the best fixed count's (if none is, the best-quality one, flagged);
- the oracle: each image stopped at the earliest step within 1 image-PQ point of its own best -- the
  limit, and `saving_captured` = (fixed - chosen) / (fixed - oracle) mean steps.

The frontier (Pareto points) is also timed at batch 1 and 8 on the same images. The chosen budget and the
baseline are re-run end to end by the task's evaluator (`check`), which must agree with the trace.
The choice goes into the model card (`inference.budget`), with the record beside it (`inference.calibration`).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence


from .errors import InputError
from .frontier import Trace, policy_signal, simulate, trace_split
from .modelcard import ModelCard

MAX_DROP = 0.5  # points (PQ, or IoU x 100)
FIXED_COUNTS = (1, 2, 3, 5, 8, 10, 15, 20, 25, 30, 40, 60, 80)  # shown in the table (every count is swept)
TOLERANCES = (0.1, 0.03, 0.01, 0.003, 0.001, 0.0003)
#: thresholds x patiences swept per policy (the tol policy sweeps TOLERANCES)
POLICY_GRID = {
    "estimate": ((0.3, 0.1, 0.03, 0.01, 0.003), (1, 2)),
    "stable": ((0.0, 0.001, 0.003, 0.01, 0.03), (1, 2, 3, 4, 6)),
    "learned": ((0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95), (1, 2, 3)),
}
#: the caps swept, as fractions of the card's: on a model whose state keeps moving on some images, a rule that
#: waits for the state spends its steps there, and a lower cap bounds them at a quality the sweep measures
CAP_DIVISORS = (1, 2, 4)
POLICY_TOL = 1e-4  # with a policy, convergence stops a sample only when its state has truly settled
LATENCY_IMAGES = 16
HELD_OUT_IMAGES = 96  # generated when no data is given: as many as the bundled cards were calibrated on
HELD_OUT_SEED = 4242  # bench's held-out seed (the training data is generated with seed 0)
_EPS = 1e-9  # float slack in "within max_drop"


@dataclass
class Point:
    """One budget of the sweep and how it scored."""

    budget: dict[str, Any]
    quality: float
    mean_iterations: float

    @property
    def early_exit(self) -> bool:
        return "tol" in self.budget

    @property
    def policy(self) -> str:
        return self.budget.get("policy", "tol") if self.early_exit else "fixed"

    def to_dict(self) -> dict[str, Any]:
        return {"budget": dict(self.budget), "quality": round(self.quality, 4),
                "mean_iterations": round(self.mean_iterations, 4)}


def check_options(max_drop: float, fixed: Sequence[int], tols: Sequence[float], max_iters: int | None) -> None:
    """Reject impossible sweep options before any work, naming the option."""
    if not (isinstance(max_drop, (int, float)) and math.isfinite(max_drop) and max_drop >= 0):
        raise InputError(f"--max-drop must be a number >= 0 (points of quality), got {max_drop}")
    if not tols:
        raise InputError("--tols: give at least one tolerance")
    bad = [t for t in tols if not (math.isfinite(t) and t >= 0)]
    if bad:
        raise InputError(f"--tols must be numbers >= 0, got {bad[0]}")
    bad_n = [n for n in fixed if n < 1]
    if bad_n:
        raise InputError(f"--fixed counts must be >= 1, got {bad_n[0]}")
    if max_iters is not None and max_iters < 1:
        raise InputError(f"--max-iters must be >= 1, got {max_iters}")


def check_policies(names: Sequence[str]) -> list[str]:
    """The policies to sweep besides tol; one line listing the valid ones for an unknown name."""
    unknown = [n for n in names if n not in ("tol", *POLICY_GRID)]
    if unknown:
        raise InputError(f"unknown halting policy {unknown[0]!r}; valid: tol, {', '.join(POLICY_GRID)}")
    return [n for n in names if n != "tol"]


def parse_list(text: str | None, kind: type, option: str) -> list | None:
    """A comma list from the command line ("5,10,20"); None when not given."""
    if text is None:
        return None
    try:
        return [kind(t.strip()) for t in text.split(",") if t.strip()]
    except ValueError:
        raise InputError(f"{option} must be a comma list of {kind.__name__}s, got {text!r}") from None


def sweep(trace: Trace, *, cap: int, tols: Sequence[float], policies: Sequence[str], head=None) -> list[Point]:
    """Every fixed count up to the cap; at each swept cap, every tolerance and every policy x threshold x
    patience; all from one trace."""
    points = [Point({"iters": n}, *trace.fixed(n)) for n in range(1, cap + 1)]
    signals = {policy: policy_signal(trace, policy, head) for policy in policies}
    for limit in sorted({max(1, cap // d) for d in CAP_DIVISORS}, reverse=True):
        for tol in sorted(tols, reverse=True):
            stops = simulate(trace, tol=tol, cap=limit)
            points.append(Point({"max_iters": limit, "tol": float(tol)}, *trace.score(stops)))
        for policy in policies:
            thresholds, patiences = POLICY_GRID[policy]
            for threshold in thresholds:
                for patience in patiences:
                    stops = simulate(trace, tol=POLICY_TOL, cap=limit, policy=policy, threshold=threshold,
                                     patience=patience, signal=signals[policy])
                    budget = {"max_iters": limit, "tol": POLICY_TOL, "policy": policy, "threshold": threshold,
                              "patience": patience}
                    points.append(Point(budget, *trace.score(stops)))
    return points


def frontier(points: Sequence[Point]) -> list[Point]:
    """The Pareto points: no other point is at least as good with fewer mean steps."""
    best, out = -math.inf, []
    for p in sorted(points, key=lambda p: (p.mean_iterations, -p.quality)):
        if p.quality > best + _EPS:
            out.append(p)
            best = p.quality
    return out


def choose(points: Sequence[Point], max_drop: float = MAX_DROP) -> dict[str, Any]:
    """The fixed baseline and the chosen early-exit budget (see the module doc)."""
    early = [p for p in points if p.early_exit]
    fixed = sorted((p for p in points if not p.early_exit), key=lambda p: p.budget["iters"])
    if not early:
        raise InputError("the sweep has no early-exit budget to choose from")
    best_fixed = max((p.quality for p in fixed), default=max(p.quality for p in early))
    floor = best_fixed - max_drop - _EPS
    within = [p for p in early if p.quality >= floor]
    chosen = (min(within, key=lambda p: (p.mean_iterations, -p.quality)) if within
              else max(early, key=lambda p: (p.quality, -p.mean_iterations)))
    baseline = next((p for p in fixed if p.quality >= floor), None)
    return {
        "budget": dict(chosen.budget),
        "policy": chosen.policy,
        "quality": chosen.quality,
        "mean_iterations": chosen.mean_iterations,
        "best_quality": best_fixed,
        "within_max_drop": bool(within),
        "fixed_baseline": None if baseline is None else {
            "iters": baseline.budget["iters"], "quality": baseline.quality, "mean_iterations": baseline.mean_iterations},
    }


def default_max_iters(model, fixed: Sequence[int] | None) -> int:
    """The cap: the one the card was calibrated under (its budget's may be a swept fraction of it), else the
    budget's, else 4x the training steps, else the largest fixed count given (or listed)."""
    card = ModelCard.of(model)
    calibration = card.inference.get("calibration") or {}
    budget = card.inference.get("budget") or {}
    for cap in (calibration.get("cap"), budget.get("max_iters")):
        if cap:
            return int(cap)
    steps = card.training.get("steps") if isinstance(card.training, dict) else None
    if isinstance(steps, int) and steps > 0:
        return 4 * steps
    return max(fixed or FIXED_COUNTS)


def race(arms: Mapping[Any, tuple], stack, batch: int, repeats: int = 1) -> dict[Any, float | None]:
    """Mean ms per image of each (backend, budget) arm over `stack` in batches of `batch`, best of `repeats`;
    the arms alternate within each repeat so that a change of machine load falls on all of them. None where
    the stack holds fewer images than the batch."""
    groups = [stack[i:i + batch] for i in range(0, len(stack) - batch + 1, batch)]
    if not groups:
        return {name: None for name in arms}
    for backend, budget in arms.values():
        backend.run(groups[0], **budget)  # warm-up
    best = {name: math.inf for name in arms}
    for _ in range(repeats):
        for name, (backend, budget) in arms.items():
            start = time.perf_counter()
            for g in groups:
                backend.run(g, **budget)
            best[name] = min(best[name], (time.perf_counter() - start) / (len(groups) * batch))
    return {name: round(1e3 * t, 3) for name, t in best.items()}


def measure_latency(model, data, budgets: Sequence[Mapping[str, Any]], *, split: str, batches=(1, 8),
                    images: int = LATENCY_IMAGES, threads: int | None = None) -> list[dict[str, float]]:
    """Mean ms per image of each budget at each batch size, PyTorch eager on the first `images` images."""
    from .runtime import TorchBackend
    from .tasks import task_of

    task = task_of(model)
    stack = task.images(task.open(data, split), images)
    backend = TorchBackend(model, threads=threads)
    arms = {i: (backend, dict(budget)) for i, budget in enumerate(budgets)}
    by_batch = {b: race(arms, stack, b) for b in batches}
    return [{f"batch{b}_ms": by_batch[b][i] for b in batches} for i in arms]


def _fit(model, data, split: str, cap: int, limit: int, progress) -> Any:
    """The learned policy's head, fitted on the `split` images (never the calibration ones)."""
    from .halting_fit import attach_head, fit_head

    if progress:
        progress(f"tracing {split} for the halting head ({cap} steps per image)")
    head = fit_head(trace_split(model, data, split=split, steps=cap, limit=limit))
    attach_head(model, head)
    return head


def _check(model, data, split: str, limit: int, choice: Mapping[str, Any]) -> dict[str, Any]:
    """The chosen budget and the baseline re-run end to end by the task's evaluator."""
    from .tasks import scorer_for

    scorer = scorer_for(model, data, split=split, limit=limit)
    out = {}
    budgets = {"chosen": choice["budget"]}
    if choice["fixed_baseline"]:
        budgets["fixed_baseline"] = {"iters": choice["fixed_baseline"]["iters"]}
    for name, budget in budgets.items():
        result = scorer.evaluate(**budget)
        out[name] = {"budget": budget, "quality": round(scorer.quality(result), 4),
                     "mean_iterations": round(scorer.mean_iterations(result), 4), **scorer.details(result)}
    return out


def calibrate(model, data: str | os.PathLike, *, max_drop: float = MAX_DROP, fixed: Sequence[int] | None = None,
              tols: Sequence[float] | None = None, max_iters: int | None = None, split: str = "val", limit: int = 0,
              policies: Sequence[str] = ("tol", "estimate", "stable", "learned"), fit_head: bool = False,
              head_split: str = "train", latency: bool = True, check: bool = True,
              progress: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """Trace, sweep, choose; return the calibration record (JSON-ready). `fit_head`: fit the learned
    policy's head on `head_split` first (it joins the model); without a head the learned policy is skipped.
    `fixed`: the counts listed in the table (every count up to the cap is swept)."""
    tols = list(TOLERANCES if tols is None else tols)
    check_options(max_drop, list(fixed or FIXED_COUNTS), tols, max_iters)
    others = check_policies(policies)
    from .tasks import task_of

    task = task_of(model)
    task.open(data, split)  # model and data checked before any work or output
    if fit_head:
        task.open(data, head_split)
    cap = max_iters or default_max_iters(model, fixed)
    head = _fit(model, data, head_split, cap, limit, progress) if fit_head and "learned" in others else None
    head = head or getattr(model, "halting_head", None)
    if head is None:
        others = [p for p in others if p != "learned"]
    if progress:
        progress(f"tracing {split} ({cap} steps per image, decoded after each)")
    trace = trace_split(model, data, split=split, steps=cap, limit=limit)
    points = sweep(trace, cap=cap, tols=tols, policies=others, head=head)
    choice = choose(points, max_drop)
    oracle_q, oracle_steps = trace.score(trace.oracle())
    pareto = frontier(points)
    record = {
        "task": trace.task, "metric": trace.metric, "data": str(data), "split": split, "images": len(trace.residual),
        "max_drop": max_drop, "cap": cap, "listed_fixed": sorted({int(n) for n in (fixed or FIXED_COUNTS) if n <= cap}),
        **choice,
        "oracle": {"quality": round(oracle_q, 4), "mean_iterations": round(oracle_steps, 4)},
        "saving_captured": _saving(choice, oracle_steps),
        "frontier": [p.to_dict() for p in pareto],
        "sweep": [p.to_dict() for p in points],
    }
    if latency:
        timed = [p.budget for p in pareto if p.early_exit and p.budget != choice["budget"]] + [choice["budget"]]
        if choice["fixed_baseline"]:
            timed.append({"iters": choice["fixed_baseline"]["iters"]})
        record["latency"] = [{"budget": b, **t} for b, t in zip(timed, measure_latency(model, data, timed, split=split))]
    if check:
        record["check"] = _check(model, data, split, limit, choice)
    return record


def held_out(model, folder: str | os.PathLike, count: int = HELD_OUT_IMAGES) -> Path:
    """Held-out data generated at the card's image size (the scale the model was trained and evaluated
    at, so the calibration measures the model the card describes): the folder to calibrate on."""
    from .tasks import task_of

    return task_of(model).generate(Path(folder), count, ModelCard.of(model).image_size, seed=HELD_OUT_SEED)


def _saving(choice: Mapping[str, Any], oracle_steps: float) -> float | None:
    base = choice["fixed_baseline"]
    if not base or base["mean_iterations"] <= oracle_steps:
        return None
    return round((base["mean_iterations"] - choice["mean_iterations"]) / (base["mean_iterations"] - oracle_steps), 4)


def card_meta(meta: Mapping[str, Any] | None, calibration: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a card's metadata with the chosen budget and the record (other inference options kept)."""
    new = dict(meta or {})
    inference = dict(ModelCard.of(new).inference)
    inference["budget"] = dict(calibration["budget"])
    inference["calibration"] = dict(calibration)
    new["inference"] = inference
    return new


def check_destination(out: Path | None, source: str) -> Path | None:
    """Where the calibrated checkpoint goes: --out, else the checkpoint file itself; never a bundled
    model inside the package (None: nothing to write to, pass --out)."""
    from . import zoo

    bundled = Path(zoo.__file__).resolve().parent
    target = out if out is not None else (Path(source) if Path(source).is_file() else None)
    if target is None:
        return None
    if target.is_dir():
        raise InputError(f"{target} is a folder: give a checkpoint file name (e.g. {target / 'calibrated.pt'})")
    if target.exists() and target.resolve().parent == bundled:
        raise InputError(f"{target} is a bundled model inside the package: write the calibrated copy elsewhere with --out")
    if out is None and target.name.endswith(".pth.tar"):  # a file of the paper's public code is never rewritten
        raise InputError(f"{target} is a checkpoint of the paper's public code: write the calibrated copy with --out")
    return target


def budget_label(budget: Mapping[str, Any]) -> str:
    if "iters" in budget:
        return f"iters={budget['iters']}"
    if budget.get("policy", "tol") == "tol":
        return f"tol={budget['tol']:g}, cap {budget['max_iters']}"
    return f"{budget['policy']} {budget['threshold']:g} x{budget['patience']}, cap {budget['max_iters']}"


def _rows(calibration: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The table's rows: the listed fixed counts, the baseline, every tolerance, and per other policy its
    frontier points and its best point within max_drop."""
    c = calibration
    base = c["fixed_baseline"]
    keep = set(c["listed_fixed"]) | ({base["iters"]} if base else set())
    on_frontier = [p["budget"] for p in c["frontier"]]
    rows = [p for p in c["sweep"] if "iters" in p["budget"] and p["budget"]["iters"] in keep]
    rows += [p for p in c["sweep"] if p["budget"].get("policy", "tol") == "tol" and "tol" in p["budget"]]
    floor = c["best_quality"] - c["max_drop"] - _EPS
    for policy in sorted({p["budget"].get("policy") for p in c["sweep"]} - {None, "tol"}):
        mine = [p for p in c["sweep"] if p["budget"].get("policy") == policy]
        ok = [p for p in mine if p["quality"] >= floor]
        best = min(ok, key=lambda p: p["mean_iterations"]) if ok else max(mine, key=lambda p: p["quality"])
        rows += [p for p in mine if p["budget"] in on_frontier or p is best]
    return rows


def format_table(calibration: Mapping[str, Any], title: str | None = None):
    """Quality vs mean steps: fixed counts, tolerances, each policy's frontier and best; marks for the choice,
    the baseline and the frontier; the oracle last."""
    from rich.table import Table

    c = calibration
    metric = c["metric"] + (" x 100" if c["metric"] == "IoU" else "")
    table = Table(title=title or f"calibration on {c['data']} ({c['images']} images)")
    for col, justify in (("policy", "left"), ("budget", "left"), (metric, "right"), ("mean steps", "right"), ("", "left")):
        table.add_column(col, justify=justify)
    base, on_frontier = c["fixed_baseline"], [p["budget"] for p in c["frontier"]]
    for p in _rows(c):
        b = p["budget"]
        marks = []
        if b == c["budget"]:
            marks.append("<- chosen")
        if base and b == {"iters": base["iters"]}:
            marks.append("<- equal-quality fixed count")
        if b in on_frontier:
            marks.append("frontier")
        policy = "fixed" if "iters" in b else b.get("policy", "tol")
        table.add_row(policy, budget_label(b), f"{p['quality']:.2f}", f"{p['mean_iterations']:.2f}", " ".join(marks),
                      style="bold" if b == c["budget"] else None)
    o = c["oracle"]
    table.add_row("oracle", "per image, earliest step within 1 image-PQ point of its best", f"{o['quality']:.2f}",
                  f"{o['mean_iterations']:.2f}", "the limit", style="dim")
    return table


def summary_lines(calibration: Mapping[str, Any]) -> list[str]:
    c, m = calibration, calibration["metric"]
    lines = [f"best fixed count's {m}: {c['best_quality']:.2f}; chosen {budget_label(c['budget'])}: {m} "
             f"{c['quality']:.2f} at {c['mean_iterations']:.2f} mean steps"]
    if not c["within_max_drop"]:
        lines.append(f"warning: no early-exit budget is within {c['max_drop']} points of the best fixed count; "
                     "chose the best of them")
    base = c["fixed_baseline"]
    if base:
        lines.append(f"smallest fixed count within {c['max_drop']} points of the best: {base['iters']} ({m} "
                     f"{base['quality']:.2f}); the chosen budget runs {c['mean_iterations'] / base['iters']:.2f}x its "
                     "steps (the equal-quality baseline `crbp-deploy bench` times it against)")
    o = c["oracle"]
    lines.append(f"per-image oracle: {m} {o['quality']:.2f} at {o['mean_iterations']:.2f} mean steps; saving captured "
                 f"{c['saving_captured'] if c['saving_captured'] is not None else 'n/a'}")
    for row in c.get("latency", []):
        times = ", ".join(f"batch {k[5:-3]} {v:.1f} ms/image" for k, v in row.items() if k.endswith("_ms") and v)
        lines.append(f"latency {budget_label(row['budget'])}: {times or 'not measured (too few images)'}")
    for name, r in (c.get("check") or {}).items():
        lines.append(f"end-to-end check, {name} {budget_label(r['budget'])}: {m} {r['quality']:.2f} at "
                     f"{r['mean_iterations']:.2f} mean steps")
    return lines


def plot(calibration: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """One chart: quality vs mean steps of the fixed counts (a line), each policy's own frontier, the
    oracle (the limit) and the chosen budget circled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c, path = calibration, Path(path)
    metric = c["metric"] + (" x 100" if c["metric"] == "IoU" else "")
    fig, ax = plt.subplots(figsize=(7.2, 4.6))
    fixed = [p for p in c["sweep"] if "iters" in p["budget"]]
    ax.plot([p["mean_iterations"] for p in fixed], [p["quality"] for p in fixed], "-", color="gray", lw=1.5,
            label="fixed count")
    for policy in ("tol", *POLICY_GRID):
        mine = [Point(p["budget"], p["quality"], p["mean_iterations"]) for p in c["sweep"]
                if "tol" in p["budget"] and p["budget"].get("policy", "tol") == policy]
        if mine:
            line = frontier(mine)
            ax.plot([p.mean_iterations for p in line], [p.quality for p in line], "-o", ms=3, lw=1, label=policy)
    o = c["oracle"]
    ax.plot([o["mean_iterations"]], [o["quality"]], "*", ms=14, color="black", label="per-image oracle")
    ax.scatter([c["mean_iterations"]], [c["quality"]], s=220, facecolors="none", edgecolors="red", zorder=5,
               label=f"chosen: {budget_label(c['budget'])}")
    ax.axhline(c["best_quality"] - c["max_drop"], color="gray", ls=":", lw=1, label=f"best fixed - {c['max_drop']:g}")
    ax.set_xlabel("mean steps per image")
    ax.set_ylabel(metric)
    lo = min(p["quality"] for p in c["sweep"])
    ax.set_ylim(max(lo, c["best_quality"] - 15), max(c["best_quality"], o["quality"]) + 1)
    ax.set_title(f"halting policies: {c['task']}, {c['images']} held-out images")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    except OSError as exc:
        raise InputError(f"cannot write the plot to {path}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)
    return path
