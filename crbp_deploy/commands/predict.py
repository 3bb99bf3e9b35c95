"""`crbp-deploy predict`: COCO panoptic files for images, computed here or by a running server."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ..errors import CrbpError
from .options import POLICY_HELP, budget_options


def predict(
    images: List[Path] = typer.Argument(..., help="Image files (PNG, JPEG, WebP, ...)."),
    model: Optional[str] = typer.Option(None, "--model", help="Checkpoint or bundled model (default: bundled)."),
    out: Path = typer.Option(Path("predictions"), "--out", help="Folder for the outputs."),
    url: Optional[str] = typer.Option(None, "--url", help="Send to a running server instead (e.g. http://127.0.0.1:8080/predictions/crbp-panoptic)."),
    token: Optional[str] = typer.Option(None, "--token", help="With --url: inference key (default: $CRBP_DEPLOY_TOKEN or the key of a local `crbp-deploy serve`)."),
    iters: Optional[int] = typer.Option(None, "--iters"),
    max_iters: Optional[int] = typer.Option(None, "--max-iters"),
    tol: Optional[float] = typer.Option(None, "--tol"),
    policy: Optional[str] = typer.Option(None, "--policy", help=POLICY_HELP),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="The halting policy's threshold."),
    patience: Optional[int] = typer.Option(None, "--patience", help="Steps in a row the policy must fire."),
    backend: str = typer.Option("torch", "--backend", help="torch | onnxruntime | openvino (a checkpoint is exported to an early-exit ONNX first)."),
    precision: str = typer.Option("fp32", "--precision", help="fp32 | bf16 (torch autocast or OpenVINO; refused where this machine lacks it)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Runtime threads (default: the runtime's)."),
    scale: Optional[str] = typer.Option(None, "--scale", help="card: run at the model's trained scale (its card's image size, as the shorter side) and answer at the original size (the default) | native: run the image as it is."),
) -> None:
    """Write <stem>_panoptic.png (COCO ids), <stem>_panoptic.json and <stem>_overlay.png per image."""
    from ..imageio import read_image
    from ..panoptic.predict import write_prediction

    if scale is not None:
        from ..panoptic.predict import check_scale

        check_scale(scale)
    if url:
        _predict_url(images, url, model, token, out, iters, max_iters, tol, scale)
        return
    if backend == "torch" and precision == "fp32" and threads is None:
        from ..sources import resolve_model
        from ..tasks import PANOPTIC

        m, source = resolve_model(model)
        predictor = PANOPTIC.runner(m, source=source)
    else:
        predictor = _backend_predictor(model, backend, precision, threads)
    budget = budget_options(iters, max_iters, tol, policy, threshold, patience)
    arrays = [read_image(p) for p in images]  # all validated before any work starts
    for path, image, pred in zip(images, arrays, predictor.predict(arrays, scale=scale, **budget)):
        write_prediction(out, path.stem, image, pred, predictor.categories)
        typer.echo(
            f"{path}: {len(pred.segments_info)} segments, {pred.iterations} iterations, "
            f"residual {pred.residual:.2e}, converged {pred.converged}, stopped: {pred.stopped} "
            f"-> {out / (path.stem + '_panoptic.json')}"
        )


def _backend_predictor(spec: Optional[str], kind: str, precision: str, threads: Optional[int]):
    """A predictor over `kind`'s Backend; a checkpoint goes to onnxruntime/openvino as an early-exit ONNX
    export (compacted Loop, the card's budget) written to a temporary folder that lives with the process."""
    import atexit
    import shutil
    import tempfile

    from ..artifact import read_card
    from ..panoptic.predict import PanopticPredictor
    from ..runtime import ALIASES, load_backend
    from ..sources import resolve

    kind = ALIASES.get(kind, kind)
    if kind not in ("torch", "onnxruntime", "openvino"):
        raise CrbpError(f"--backend must be torch, onnxruntime or openvino, got {kind!r}")
    source = resolve(spec)
    options = {"precision": precision, "threads": threads}
    if source.kind == "onnx":
        card = read_card(source.path)
        if card is None or not card.categories:
            raise CrbpError(f"{source.path}: its sidecar (model card with the categories) is missing")
        return PanopticPredictor.from_backend(load_backend(source.path, kind, **options), card)
    from ..tasks import PANOPTIC

    model = source.load_model()
    PANOPTIC.runner(model, source=source.label)  # a clear error for a model that is not panoptic
    if kind == "torch":
        return PanopticPredictor.from_backend(load_backend(model, "torch", **options), model.meta)
    from ..export import export_onnx
    from ..modelcard import ModelCard

    folder = tempfile.mkdtemp(prefix="crbp-predict-")
    atexit.register(shutil.rmtree, folder, True)
    budget = ModelCard.of(model).budget.early().kwargs()
    if kind == "openvino":
        from ..runtime.openvino_backend import check_installed

        check_installed()  # before the export, not after it
    artifact = export_onnx(model, Path(folder) / f"{source.name}-loop.onnx", strategy="loop", **budget)
    return PanopticPredictor.from_backend(load_backend(artifact.path, kind, **options), model.meta)


def _predict_url(images, url, model, token, out, iters, max_iters, tol, scale=None) -> None:
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
            answer = client.post(path.read_bytes(), max_iters=max_iters, tol=tol,
                                 headers={"X-Scale": scale} if scale else None)
            pred = answer.prediction()  # raises with the server's message on an error status
            write_prediction(out, path.stem, image, pred, answer.body["categories"])
            typer.echo(
                f"{path}: {len(pred.segments_info)} segments, {pred.iterations} iterations, "
                f"residual {pred.residual:.2e}, converged {pred.converged} ({1000 * answer.seconds:.0f} ms from "
                f"{endpoint}) -> {out / (path.stem + '_panoptic.json')}"
            )
