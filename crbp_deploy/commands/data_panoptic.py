"""`crbp-deploy data panoptic`: write the synthetic panoptic set in the COCO panoptic layout."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .options import json_object



def panoptic(
    out: Path = typer.Option(..., "--out", help="Output folder; gets train/ and val/ in the COCO panoptic layout."),
    count: int = typer.Option(100, "--count", help="Number of images over both splits."),
    size: int = typer.Option(128, "--size", help="Image side in pixels (32..1024)."),
    seed: int = typer.Option(0, "--seed", help="Same seed, same bytes."),
    val_fraction: float = typer.Option(0.2, "--val-fraction", help="Share of images in val/."),
    config: Optional[str] = typer.Option(None, "--config", help="JSON object of generator overrides (SynthConfig)."),
    preview: Optional[Path] = typer.Option(None, "--preview", help="Also write a contact sheet PNG of the first images."),
) -> None:
    """Generate synthetic panoptic scenes: crossing curves and blobs (things) on two textured stuff classes."""
    from PIL import Image
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from ..data.panoptic_synth import SynthConfig, check_args, contact_sheet, generate_sample, write_dataset

    overrides = json_object(config, "--config")
    cfg = SynthConfig.from_dict(overrides)
    check_args(out, count, size, val_fraction)
    columns = (TextColumn("[bold]panoptic"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True, console=Console(stderr=True)) as bar:  # stdout stays clean
        task = bar.add_task("generate", total=count)
        summary = write_dataset(out, count, size, seed, val_fraction, cfg, progress=lambda i: bar.advance(task))
    splits = ", ".join(f"{n} {s}" for s, n in summary["splits"].items())
    typer.echo(
        f"wrote {splits} images of {size}x{size} to {out} "
        f"({summary['crowd_segments']} crowd segments, {100 * summary['void_fraction']:.2f}% void pixels)"
    )
    if preview is not None:
        samples = [generate_sample(i, seed, size, cfg) for i in range(min(count, 8))]
        preview.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(contact_sheet(samples, columns=2, zoom=max(1, 256 // size))).save(preview)
        typer.echo(f"wrote {preview}")
