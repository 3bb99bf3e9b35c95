"""`crbp-deploy eval`: the model's task quality on a held-out dataset (PQ, or IoU per contour length)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .options import POLICY_HELP, budget_options


def evaluate(
    model: Optional[str] = typer.Argument(None, help="Checkpoint or bundled model (default: the bundled model)."),
    data: Path = typer.Option(..., "--data", help="COCO panoptic folder (annotations.json, images/, panoptic/) or a root with SPLIT/."),
    split: str = typer.Option("val", "--split"),
    iters: Optional[int] = typer.Option(None, "--iters", help="Fixed number of recurrent steps."),
    max_iters: Optional[int] = typer.Option(None, "--max-iters", help="Early exit: iteration cap."),
    tol: Optional[float] = typer.Option(None, "--tol", help="Early exit: relative state change to stop at."),
    policy: Optional[str] = typer.Option(None, "--policy", help=POLICY_HELP),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="The halting policy's threshold."),
    patience: Optional[int] = typer.Option(None, "--patience", help="Steps in a row the policy must fire."),
    limit: int = typer.Option(0, "--limit", help="Evaluate the first N images only (0 = all)."),
    per_class: bool = typer.Option(False, "--per-class", help="Also print the per-class table."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    scale: Optional[str] = typer.Option(None, "--scale", help="Panoptic models: card (default: images run at the card's image size, scored at their own) | native."),
) -> None:
    """Panoptic models: PQ / SQ / RQ (all, things, stuff, per class). Pathfinder models: IoU and F1 overall
    and per contour length, mean iterations per length, Spearman(length, iterations). Both: iterations stats."""
    from rich.console import Console

    from ..modelcard import resolve_budget
    from ..sources import resolve_model
    from ..tasks import scorer_for, task_of

    given = budget_options(iters, max_iters, tol, policy, threshold, patience)
    m, source = resolve_model(model)
    budget = resolve_budget(m, given).kwargs()
    scorer = scorer_for(m, data, split=split, limit=limit, progress=not as_json, source=source)
    if scale is not None:
        from ..errors import InputError
        from ..panoptic.predict import check_scale

        if task_of(m).name != "panoptic":
            raise InputError("--scale applies to panoptic models (Pathfinder models run at their own size)")
        check_scale(scale)
    result = scorer.evaluate(**budget, **({"scale": scale} if scale else {}))
    result["model"], result["data"] = source, str(data)
    result.setdefault("budget", budget)
    if as_json:
        typer.echo(json.dumps(result, indent=2, default=str))
        return
    console = Console()
    for item in task_of(m).report(result, scorer.dataset, per_class=per_class):
        console.print(item)
