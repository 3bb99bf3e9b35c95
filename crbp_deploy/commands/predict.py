"""`crbp-deploy predict`: COCO panoptic files for images, computed here or by a running server."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ..errors import CrbpError
from .evaluate import _budget, _predictor


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
