"""`crbp-deploy demo`: the whole path on one model, end to end, with a real TorchServe.

export (early-exit ONNX) -> verify (against PyTorch) -> package (.mar) -> serve (TorchServe on
127.0.0.1, token auth on) -> send sample images (plus one bad request) -> results table -> stop.
"""
from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Optional

import typer

from ..errors import CrbpError


def _samples(count: int, size: int) -> list[tuple[str, bytes]]:
    """Synthetic COCO-panoptic scenes (the bundled model's training domain) as PNG bytes."""
    from PIL import Image

    from ..data.panoptic_synth import generate_sample

    out = []
    for i in range(count):
        side = size if i % 2 == 0 else size + size // 2  # two sizes: both batching groups show up
        buf = io.BytesIO()
        Image.fromarray(generate_sample(i, seed=2024, size=side)[0]).save(buf, format="PNG")
        out.append((f"scene-{i}", buf.getvalue()))
    return out


def _metrics_line(url: str, model: str) -> str:
    """A one-line summary of the model metrics on /metrics (they arrive within a second or two)."""
    import urllib.request

    values: dict[str, float] = {}
    for _ in range(10):
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        for line in text.splitlines():
            for key in ("IterationsToConverge_count", "IterationsToConverge_sum", "NotConverged"):
                if line.startswith(f'{key}{{ModelName="{model}"'):
                    values[key] = float(line.rsplit(" ", 1)[1])
        if "IterationsToConverge_count" in values:
            break
        time.sleep(0.5)
    if not values.get("IterationsToConverge_count"):
        return f"metrics: {url} (model metrics not reported yet)"
    count = values["IterationsToConverge_count"]
    return (f"metrics ({url}): IterationsToConverge count {count:.0f}, mean "
            f"{values['IterationsToConverge_sum'] / count:.1f}; NotConverged {values.get('NotConverged', 0):.0f}")


def demo(
    model: Optional[str] = typer.Argument(None, help="Checkpoint or bundled model (default: the bundled model)."),
    port: int = typer.Option(8080, "--port", help="Inference port P (management P+1, metrics P+2)."),
    images: int = typer.Option(6, "--images", help="Sample images to send."),
    size: int = typer.Option(0, "--size", help="Sample image side (0: the model card's evaluation size, else 64)."),
    export_dir: Path = typer.Option(Path("export"), "--export-dir", help="Folder for the ONNX export."),
    model_store: Path = typer.Option(Path("model_store"), "--model-store", help="Folder for the .mar archive."),
    keep_running: bool = typer.Option(False, "--keep-running", help="Leave the server up at the end."),
) -> None:
    """Export -> verify -> package -> serve -> send sample images -> results table -> stop."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from ..export import export_onnx, verify
    from ..modelcard import ModelCard
    from ..serving.archive import DEFAULT_NAME, package
    from ..serving.client import Client
    from ..serving.engine import get_engine
    from ..sources import resolve_model

    console = Console()
    started = time.perf_counter()

    def step(n: int, text: str) -> None:
        console.print(f"[bold cyan][{n}/6][/] {text}  [dim](+{time.perf_counter() - started:.0f} s)[/]")

    net, source = resolve_model(model)
    card = ModelCard.of(net)
    if not card.categories:
        raise CrbpError(f"{source} is not a trained panoptic model (its card lists no categories)")
    name = DEFAULT_NAME if model is None else Path(str(model)).stem
    budget = card.budget.early()
    onnx = export_dir / f"{name}-loop.onnx"
    step(1, f"export {source} -> {onnx} (early-exit loop, max_iters={budget.max_iters}, tol={budget.tol})")
    export_onnx(net, onnx, strategy="loop", source=source, **budget.kwargs())
    step(2, "verify the export against PyTorch")
    report = verify(onnx, net)
    console.print(report.summary())
    step(3, f"package {name}.mar")
    result = package(onnx, name=name, out=model_store)
    console.print(f"{result.path} ({result.size_bytes / 1e6:.1f} MB)")
    step(4, f"serve on http://127.0.0.1:{port} (token auth on)")
    engine = get_engine("torchserve")  # the demo reads TorchServe's metrics endpoint
    server = engine.start(result.path.parent, engine.configure(port), models=[name], progress=console.print)
    try:
        console.print(f"up: {server.predictions_url(name)}; keys in {server.key_file}; metrics {server.metrics_url}")
        side = size or card.image_size
        samples = _samples(images, side)
        step(5, f"send {len(samples)} sample images and one bad request")
        table = Table(title=f"{name} through TorchServe", box=box.SIMPLE)
        for col in ("image", "size", "status", "segs", "iters", "conv.", "resid.", "model ms", "total ms"):
            table.add_column(col, justify="left" if col == "image" else "right")
        errors = []
        with Client(server.predictions_url(name), token=server.token) as client:
            for label, data in [*samples, ("text", b"plain text")]:
                answer = client.post(data)
                body, ms = answer.body, f"{1000 * answer.seconds:.1f}"
                if answer.ok:
                    residual = "-" if body["residual"] is None else f"{body['residual']:.1e}"
                    table.add_row(label, "x".join(map(str, body["size"])), "200", str(len(body["segments_info"])),
                                  str(body["iterations"]), "yes" if body["converged"] else "no", residual,
                                  f"{body['timings_ms']['model']:.1f}", ms)
                else:
                    table.add_row(label, "-", str(answer.status), "-", "-", "-", "-", "-", ms)
                    errors.append(f"{label}: {answer.status} {body.get('message', '')}")
        console.print(table)
        for line in errors:
            console.print(f"[yellow]{line}[/]")
        console.print(_metrics_line(server.metrics_url, name))
    finally:
        if keep_running:
            console.print(f"left running; stop it with: crbp-deploy serve --stop --port {port}")
        else:
            step(6, "stop the server")
            server.stop()
            console.print(f"stopped; done in {time.perf_counter() - started:.0f} s")
