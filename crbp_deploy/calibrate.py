"""Calibrate a model's inference budget on held-out data (`crbp-deploy calibrate`).

Sweeps fixed iteration counts and early-exit tolerances, scores each (PQ for panoptic models, IoU x
100 for Pathfinder ones, both in points), and picks

- the budget: the loosest `tol` whose quality is within `max_drop` points of the best quality of the
  whole sweep (fixed counts included), with the sweep's iteration cap;
- the equal-quality fixed baseline: the smallest fixed count within `max_drop` of the chosen
  budget's quality -- what early exit has to beat on speed (`crbp-deploy bench` compares the two).

The chosen budget goes into the model card (`meta["inference"]["budget"]`), where predict, export,
serve and bench read it, with the sweep beside it (`meta["inference"]["calibration"]`).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from .errors import InputError
from .modelcard import ModelCard
from .quality import Scorer

MAX_DROP = 0.5  # points (PQ, or IoU x 100)
FIXED_COUNTS = (1, 2, 3, 5, 8, 10, 15, 20, 25, 30, 40, 60, 80)
TOLERANCES = (0.1, 0.03, 0.01, 0.003, 0.001, 0.0003)
_EPS = 1e-9  # float slack in "within max_drop"


@dataclass
class Point:
    """One budget of the sweep and how it scored."""

    budget: dict[str, Any]
    quality: float
    mean_iterations: float
    details: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict, repr=False)  # the task's full result (not stored in cards)

    @property
    def early_exit(self) -> bool:
        return "tol" in self.budget

    def to_dict(self) -> dict[str, Any]:
        return {"budget": dict(self.budget), "quality": round(self.quality, 4),
                "mean_iterations": round(self.mean_iterations, 4), **self.details}


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


def parse_list(text: str | None, kind: type, option: str) -> list | None:
    """A comma list from the command line ("5,10,20"); None when not given."""
    if text is None:
        return None
    try:
        return [kind(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise InputError(f"{option} must be a comma list of {kind.__name__}s, got {text!r}") from None


def sweep(scorer: Scorer, *, fixed: Iterable[int], tols: Iterable[float], max_iters: int,
          progress: Callable[[str], Any] | None = None) -> list[Point]:
    """Score every fixed count and every tolerance (cap `max_iters`) with one Scorer."""
    points = []
    budgets = [{"iters": int(n)} for n in fixed] + [{"max_iters": int(max_iters), "tol": float(t)} for t in tols]
    for budget in budgets:
        result = scorer.evaluate(**budget)
        point = Point(budget, scorer.quality(result), scorer.mean_iterations(result), scorer.details(result), result)
        points.append(point)
        if progress:
            progress(f"{budget}: {scorer.metric} {point.quality:.2f}, {point.mean_iterations:.2f} iterations")
    return points


def choose(points: Sequence[Point], max_drop: float = MAX_DROP) -> dict[str, Any]:
    """The loosest tolerance within `max_drop` of the sweep's best quality, and the smallest fixed
    count within `max_drop` of that tolerance's quality (see the module doc)."""
    early = [p for p in points if p.early_exit]
    fixed = sorted((p for p in points if not p.early_exit), key=lambda p: p.budget["iters"])
    if not early:
        raise InputError("the sweep has no early-exit tolerance to choose from")
    best = max(p.quality for p in points)
    within = [p for p in early if p.quality >= best - max_drop - _EPS]
    if within:
        chosen = max(within, key=lambda p: (p.budget["tol"], -p.mean_iterations))
    else:  # no tolerance is good enough: the best of them, flagged
        chosen = max(early, key=lambda p: (p.quality, p.budget["tol"]))
    baseline = next((p for p in fixed if p.quality >= chosen.quality - max_drop - _EPS), None)
    return {
        "budget": dict(chosen.budget),
        "quality": chosen.quality,
        "mean_iterations": chosen.mean_iterations,
        "best_quality": best,
        "within_max_drop": bool(within),
        "fixed_baseline": None if baseline is None else {
            "iters": baseline.budget["iters"], "quality": baseline.quality, "mean_iterations": baseline.mean_iterations},
        "chosen": chosen,
    }


def default_max_iters(model, fixed: Sequence[int] | None) -> int:
    """The early-exit cap: the card's, else 4x the training steps, else the largest fixed count swept."""
    card = ModelCard.of(model)
    budget = card.inference.get("budget") or {}
    if budget.get("max_iters"):
        return int(budget["max_iters"])
    steps = card.training.get("steps") if isinstance(card.training, dict) else None
    if isinstance(steps, int) and steps > 0:
        return 4 * steps
    return max(fixed or FIXED_COUNTS)


def calibrate(model, data: str | os.PathLike, *, max_drop: float = MAX_DROP, fixed: Sequence[int] | None = None,
              tols: Sequence[float] | None = None, max_iters: int | None = None, split: str = "val", limit: int = 0,
              scorer: Scorer | None = None, progress: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """Sweep, choose, and return the calibration record (JSON-ready; `points` keep the full results)."""
    from .quality import scorer_for

    tols = list(TOLERANCES if tols is None else tols)
    fixed_given = fixed is not None
    fixed = list(FIXED_COUNTS if fixed is None else fixed)
    check_options(max_drop, fixed, tols, max_iters)
    scorer = scorer or scorer_for(model, data, split=split, limit=limit)
    cap = max_iters or default_max_iters(model, fixed if fixed_given else None)
    if not fixed_given:
        fixed = [n for n in fixed if n <= cap]
    points = sweep(scorer, fixed=fixed, tols=sorted(tols, reverse=True), max_iters=cap, progress=progress)
    choice = choose(points, max_drop)
    choice.pop("chosen")
    return {
        "task": scorer.task,
        "metric": scorer.metric,
        "data": str(data),
        "images": scorer.images,
        "max_drop": max_drop,
        **choice,
        "sweep": [p.to_dict() for p in points],
        "points": points,
    }


def record(calibration: Mapping[str, Any]) -> dict[str, Any]:
    """The calibration as stored in a card and printed by --json (without the full results)."""
    return {k: v for k, v in calibration.items() if k != "points"}


def card_meta(meta: Mapping[str, Any] | None, calibration: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a card's metadata with the chosen budget and the sweep (other inference options kept)."""
    new = dict(meta or {})
    inference = dict(ModelCard.of(new).inference)
    inference["budget"] = dict(calibration["budget"])
    inference["calibration"] = record(calibration)
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
    return target


def format_table(calibration: Mapping[str, Any], title: str | None = None):
    """Quality vs mean iterations for every budget of the sweep; the choice and the baseline marked."""
    from rich.table import Table

    metric = calibration["metric"] + (" x 100" if calibration["metric"] == "IoU" else "")
    table = Table(title=title or f"calibration on {calibration['data']} ({calibration['images']} images)")
    for col, justify in (("strategy", "left"), ("budget", "left"), (metric, "right"), ("mean it.", "right"), ("", "left")):
        table.add_column(col, justify=justify)
    chosen, base = calibration["budget"], calibration["fixed_baseline"]
    for p in calibration["sweep"]:
        b = p["budget"]
        early = "tol" in b
        mark = ""
        if b == chosen:
            mark = "<- chosen budget"
        elif base and not early and b["iters"] == base["iters"]:
            mark = "<- equal-quality fixed count"
        label = f"tol={b['tol']:g}, cap {b['max_iters']}" if early else f"iters={b['iters']}"
        table.add_row("early exit" if early else "fixed", label, f"{p['quality']:.2f}", f"{p['mean_iterations']:.2f}",
                      mark, style="bold" if b == chosen else None)
    return table


def summary_lines(calibration: Mapping[str, Any]) -> list[str]:
    c, m = calibration, calibration["metric"]
    lines = [f"best {m} in the sweep: {c['best_quality']:.2f}; chosen budget {c['budget']}: {m} {c['quality']:.2f} "
             f"at {c['mean_iterations']:.2f} mean iterations"]
    if not c["within_max_drop"]:
        lines.append(f"warning: no tolerance is within {c['max_drop']} points of the best; chose the best tolerance")
    base = c["fixed_baseline"]
    if base:
        lines.append(f"smallest fixed count within {c['max_drop']} points of it: {base['iters']} "
                     f"({m} {base['quality']:.2f}); early exit runs {c['mean_iterations'] / base['iters']:.2f}x "
                     "its iterations (the equal-quality baseline `crbp-deploy bench` times it against)")
    else:
        lines.append(f"no fixed count swept comes within {c['max_drop']} points of it")
    return lines


def plot(calibration: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Quality vs mean iterations: fixed counts as a line, tolerances as stars, the choice circled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    metric = calibration["metric"] + (" x 100" if calibration["metric"] == "IoU" else "")
    fixed = [p for p in calibration["sweep"] if "iters" in p["budget"]]
    early = [p for p in calibration["sweep"] if "tol" in p["budget"]]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if fixed:
        ax.plot([p["mean_iterations"] for p in fixed], [p["quality"] for p in fixed], "-o", ms=4, label="fixed count")
    ax.plot([p["mean_iterations"] for p in early], [p["quality"] for p in early], "*", ms=12, label="early exit (tol)")
    for p in early:
        ax.annotate(f"{p['budget']['tol']:g}", (p["mean_iterations"], p["quality"]), fontsize=7,
                    xytext=(4, -10), textcoords="offset points")
    ax.scatter([calibration["mean_iterations"]], [calibration["quality"]], s=220, facecolors="none",
               edgecolors="red", zorder=5, label=f"chosen {calibration['budget']}")
    ax.axhline(calibration["best_quality"] - calibration["max_drop"], color="gray", ls=":", lw=1,
               label=f"best - {calibration['max_drop']:g}")
    if len(fixed) > 1 and max(p["mean_iterations"] for p in fixed) > 8 * min(p["mean_iterations"] for p in fixed):
        ax.set_xscale("log")
    ax.set_xlabel("mean iterations per image")
    ax.set_ylabel(metric)
    ax.set_title(f"calibration: {calibration['task']}, {calibration['images']} held-out images")
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
