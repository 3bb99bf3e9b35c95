"""`crbp-deploy data pathfinder`: write a Pathfinder segmentation dataset (PNG images, masks, index.json)."""
from __future__ import annotations

from pathlib import Path

import typer


def pathfinder(
    length: int = typer.Option(14, "--length", help="Paddles per contour (the paper's 9, 14, 20, 25; any >= 3)."),
    size: int = typer.Option(64, "--size", help="Image side in pixels (PF20/PF25: 128 holds several distractors)."),
    count: int = typer.Option(..., "--count", help="Number of images."),
    out: Path = typer.Option(..., "--out", help="Output folder (images/, masks/, index.json)."),
    seed: int = typer.Option(0, "--seed", help="Dataset seed; image i depends only on (config, seed, i)."),
    distractors: int = typer.Option(
        -1, "--distractors", help="Unmarked snakes per image; -1: as many as keep clutter alike across sizes."
    ),
    markers: int = typer.Option(2, "--markers", help="2: dots at both ends of the target; 1: at its first end."),
    max_turn: float = typer.Option(30.0, "--max-turn", help="Largest turn between consecutive paddles, degrees."),
    scale: float = typer.Option(1.0, "--scale", help="Multiplies the paddle geometry (2 at size 128: the 64 picture)."),
    workers: int = typer.Option(1, "--workers", help="Processes generating in parallel (identical output)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a dataset already in --out."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
) -> None:
    """Generate a Pathfinder segmentation dataset: mask = the contour marked by the dots."""
    from ..data.pathfinder import PathfinderConfig, write_dataset
    from ..errors import InputError

    if count < 1:
        raise InputError(f"--count must be >= 1, got {count}")
    config = PathfinderConfig.from_dict(
        length=length, size=size, distractors=distractors, markers=markers, max_turn_deg=max_turn, scale=scale
    )
    index = write_dataset(out, config, count, seed=seed, progress=not no_progress, overwrite=overwrite, workers=workers)
    typer.echo(f"wrote {count} images ({config.geometry()['distractors']} distractors each) and {index}")
