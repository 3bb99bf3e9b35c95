"""`crbp-deploy eval` and `crbp-deploy predict`: PQ on a dataset, COCO panoptic files for images."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from ..errors import CrbpError


def _budget(iters: Optional[int], max_iters: Optional[int], tol: Optional[float]) -> dict:
    if iters is not None and (max_iters is not None or tol is not None):
        raise CrbpError("give --iters (fixed count) or --max-iters/--tol (early exit), not both")
    return {"iters": iters, "max_iters": max_iters, "tol": tol}


def _predictor(model_spec: Optional[str]):
    from ..cli import resolve_model

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

    from ..cli import resolve_model
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


def predict(
    images: List[Path] = typer.Argument(..., help="Image files (PNG, JPEG, WebP, ...)."),
    model: Optional[str] = typer.Option(None, "--model", help="Checkpoint or bundled model (default: bundled)."),
    out: Path = typer.Option(Path("predictions"), "--out", help="Folder for the outputs."),
    url: Optional[str] = typer.Option(None, "--url", help="Send to a running server instead (e.g. http://127.0.0.1:8080/predictions/crbp-panoptic)."),
    token: Optional[str] = typer.Option(None, "--token", help="With --url: inference key (default: $CRBP_DEPLOY_TOKEN or the key of a local `crbp-deploy serve`)."),
    iters: Optional[int] = typer.Option(None, "--iters"),
    max_iters: Optional[int] = typer.Option(None, "--max-iters"),
    tol: Optional[float] = typer.Option(None, "--tol"),
) -> None:
    """Write <stem>_panoptic.png (COCO ids), <stem>_panoptic.json and <stem>_overlay.png per image."""
    from ..imageio import read_image
    from ..panoptic.predict import write_prediction

    if url:
        _predict_url(images, url, model, token, out, iters, max_iters, tol)
        return
    predictor, _ = _predictor(model)
    budget = _budget(iters, max_iters, tol)
    arrays = [read_image(p) for p in images]  # all validated before any work starts
    for path, image, pred in zip(images, arrays, predictor.predict(arrays, **budget)):
        write_prediction(out, path.stem, image, pred, predictor.categories)
        typer.echo(
            f"{path}: {len(pred.segments_info)} segments, {pred.iterations} iterations, "
            f"residual {pred.residual:.2e}, converged {pred.converged} -> {out / (path.stem + '_panoptic.json')}"
        )


def _predict_url(images, url, model, token, out, iters, max_iters, tol) -> None:
    """The same files as a local predict, computed by a running server (one request per image)."""
    from ..imageio import read_image
    from ..panoptic.predict import write_prediction
    from ..serving.client import Client, find_token, predictions_url

    if iters is not None:
        raise CrbpError("a server runs until converged: give --max-iters/--tol, not --iters")
    endpoint = predictions_url(url, model)
    arrays = [read_image(p) for p in images]  # the same checks as a local run, before anything is sent
    with Client(endpoint, token=token or find_token(endpoint)) as client:
        for path, image in zip(images, arrays):
            answer = client.post(path.read_bytes(), max_iters=max_iters, tol=tol)
            pred = answer.prediction()  # raises with the server's message on an error status
            write_prediction(out, path.stem, image, pred, answer.body["categories"])
            typer.echo(
                f"{path}: {len(pred.segments_info)} segments, {pred.iterations} iterations, "
                f"residual {pred.residual:.2e}, converged {pred.converged} ({1000 * answer.seconds:.0f} ms from "
                f"{endpoint}) -> {out / (path.stem + '_panoptic.json')}"
            )


def register(app: typer.Typer) -> None:
    app.command("eval")(evaluate)
    app.command("predict")(predict)
