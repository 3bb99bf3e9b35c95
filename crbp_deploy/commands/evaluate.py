"""`crbp-deploy eval` and `crbp-deploy predict`: PQ on a dataset, COCO panoptic files for images."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ..errors import CrbpError


def _budget(iters: Optional[int], max_iters: Optional[int], tol: Optional[float]) -> dict:
    if iters is not None and (max_iters is not None or tol is not None):
        raise CrbpError("give --iters (fixed count) or --max-iters/--tol (early exit), not both")
    return {"iters": iters, "max_iters": max_iters, "tol": tol}


def _predictor(model_spec: Optional[str]):
    from ..sources import resolve_model

    return _panoptic_predictor(*resolve_model(model_spec))


def _panoptic_predictor(model, source: str):
    from ..panoptic.predict import PanopticPredictor

    if "categories" not in (getattr(model, "meta", None) or {}):
        raise CrbpError(f"{source} is not a trained panoptic model (its card lists no categories)")
    return PanopticPredictor.from_model(model), source


def evaluate(
    model: Optional[str] = typer.Argument(None, help="Checkpoint or bundled model (default: the bundled model)."),
    data: Path = typer.Option(..., "--data", help="COCO panoptic folder (annotations.json, images/, panoptic/) or a root with SPLIT/."),
    split: str = typer.Option("val", "--split"),
    iters: Optional[int] = typer.Option(None, "--iters", help="Fixed number of recurrent steps."),
    max_iters: Optional[int] = typer.Option(None, "--max-iters", help="Early exit: iteration cap."),
    tol: Optional[float] = typer.Option(None, "--tol", help="Early exit: relative state change to stop at."),
    limit: int = typer.Option(0, "--limit", help="Evaluate the first N images only (0 = all)."),
    per_class: bool = typer.Option(False, "--per-class", help="Also print the per-class table."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Panoptic models: PQ / SQ / RQ (all, things, stuff, per class). Pathfinder models: IoU and F1 overall
    and per contour length, mean iterations per length, Spearman(length, iterations). Both: iterations stats."""
    from rich.console import Console

    from ..sources import resolve_model
    from ..panoptic.evaluate import evaluate_predictor
    from ..panoptic.pq import format_table
    from ..quality import model_task, open_data

    budget = _budget(iters, max_iters, tol)
    m, source = resolve_model(model)
    if model_task(m) == "pathfinder":
        _evaluate_pathfinder(m, source, data, split, budget, limit, as_json)
        return
    predictor, source = _panoptic_predictor(m, source)
    dataset = open_data("panoptic", data, split)
    result = evaluate_predictor(predictor, dataset, progress=not as_json, limit=limit, **budget)
    result["model"], result["data"] = source, str(data)
    result["budget"] = {k: v for k, v in budget.items() if v is not None} or predictor.budget
    if as_json:
        typer.echo(json.dumps(result, indent=2, default=str))
        return
    console = Console()
    console.print(format_table(result, dataset.categories))
    if per_class:
        console.print(format_table(result, dataset.categories, per_class=True))
    it = result["iterations"]
    console.print(
        f"iterations: mean {it['mean']:.1f}, median {it['median']:.0f}, p90 {it['p90']:.0f}, "
        f"range {it['min']}..{it['max']}; converged {100 * it['converged_fraction']:.0f}% "
        f"(budget {result['budget']}, {result['images']} images)"
    )


def _evaluate_pathfinder(model, source: str, data: Path, split: str, budget: dict, limit: int, as_json: bool) -> None:
    from rich.console import Console

    from ..pathfinder_eval import format_table
    from ..quality import resolve_budget, scorer_for

    budget = resolve_budget(model, budget)
    result = scorer_for(model, data, split=split, limit=limit, progress=not as_json).evaluate(**budget)
    result["model"], result["data"] = source, str(data)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    console = Console()
    console.print(format_table(result, title=f"Pathfinder: {source} on {data}, budget {budget}"))
    it, rho = result["iterations"], result["spearman_length_iterations"]
    console.print(
        f"iterations: mean {it['mean']:.1f}, median {it['median']:.0f}, p90 {it['p90']:.0f}, range {it['min']}..{it['max']}; "
        f"converged {100 * it['converged_fraction']:.0f}%; Spearman(length, iterations) per image: "
        + ("n/a (constant)" if rho is None else f"{rho:.3f}")
    )
