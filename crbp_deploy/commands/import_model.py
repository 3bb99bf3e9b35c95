"""`crbp-deploy import`: a checkpoint of the paper's public code as a self-describing checkpoint of this project.

Every command already reads the public file directly (checkpoint.load maps it); this writes the mapped
model once, with its card, for users who want to keep one file of the project's format.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import InputError


def import_model(
    path: Path = typer.Argument(..., help="Checkpoint written by the paper's public code (model_fscore_..._checkpoint.pth.tar)."),
    out: Path = typer.Option(..., "--out", help="The project's checkpoint to write (.pt)."),
    iters: Optional[int] = typer.Option(None, "--iters", help="Fixed step count recorded in the card (the public code ran 6); default: early exit with the usual budget."),
) -> None:
    """Map a public-code checkpoint (hConvGRU, with or without `module.`) to hgru-public and save it."""
    from .. import checkpoint
    from ..budget import Budget

    model = checkpoint.load(path)
    if "public_code" not in model.meta:
        raise InputError(f"{path} is already a crbp-deploy checkpoint ({model.arch}); nothing to import")
    if iters is not None:
        model.meta["inference"] = {"budget": Budget(iters=iters).kwargs()}  # validated: one line for a bad count
    written = checkpoint.save(model, out, meta=model.meta)
    budget = model.meta["inference"]["budget"]
    typer.echo(f"wrote {written} ({model.arch}, {model.num_parameters():,} parameters, budget {budget}); "
               f"{model.meta['normalisation'].split(':')[0]}")
