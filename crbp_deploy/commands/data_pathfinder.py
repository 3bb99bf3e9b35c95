"""`crbp-deploy data pathfinder`: write a Pathfinder segmentation dataset (PNG images, masks, index.json)."""
from __future__ import annotations

from pathlib import Path

import typer


def pathfinder(
    length: str = typer.Option(
        "14", "--length",
        help="Paddles per contour (the paper's 9, 14, 20, 25; any >= 3), or a list such as 6,9,14,20,25: "
        "lengths mixed, balanced, each image's length recorded in index.json.",
    ),
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
    from ..data.pathfinder import PathfinderConfig, length_configs, parse_lengths, write_dataset
    from ..errors import InputError

    if count < 1:
        raise InputError(f"--count must be >= 1, got {count}")
    lengths = parse_lengths(length)
    config = PathfinderConfig.from_dict(
        length=lengths[0], size=size, distractors=distractors, markers=markers, max_turn_deg=max_turn, scale=scale
    )
    configs = length_configs(config, lengths)  # every length validated before anything is written
    index = write_dataset(
        out, config, count, seed=seed, progress=not no_progress, overwrite=overwrite, workers=workers, lengths=lengths
    )
    clutter = ", ".join(f"PF{n}: {c.distractor_count}" for n, c in configs.items())
    typer.echo(f"wrote {count} images (distractors each: {clutter}) and {index}")
