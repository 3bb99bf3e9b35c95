"""`crbp-deploy info` (a model card), `list` (registered architectures) and `create` (a random-weight checkpoint)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .options import json_object

console = Console()


def _calibration_summary(record: dict) -> dict:
    """The calibration as a table cell: the choice, its baseline and the oracle (`--json` prints the whole sweep)."""
    keep = ("data", "images", "metric", "budget", "quality", "mean_iterations", "fixed_baseline", "oracle",
            "saving_captured")
    return {k: record[k] for k in keep if k in record} | {"sweep": f"{len(record.get('sweep', []))} budgets (--json)"}


def print_card(card: dict) -> None:
    table = Table(title=f"model card: {card['architecture']}", show_header=False)
    table.add_column(style="bold cyan")
    table.add_column()
    table.add_row("source", card["source"])
    table.add_row("architecture", card["architecture"])
    table.add_row("parameters", f"{card['parameters']:,}")
    table.add_row("config", json.dumps(card["config"]))
    for key, value in card["meta"].items():
        if key == "inference" and isinstance(value, dict) and isinstance(value.get("calibration"), dict):
            value = {**value, "calibration": _calibration_summary(value["calibration"])}
        table.add_row(f"meta.{key}", json.dumps(value) if not isinstance(value, str) else value)
    if "flops" in card:
        f = card["flops"]
        table.add_row("GFLOP per step", f"{f['gflop_per_step']:.4g} at {f['image_size']}x{f['image_size']} "
                      "(convolutions of one recurrent step; bench turns it into GFLOP/s)")
    if "contraction" in card:
        c = card["contraction"]
        table.add_row(
            "contraction check",
            f"{c['converged']}/{c['inputs']} random {c['size']}x{c['size']} inputs reached tol={c['tol']:g} "
            f"(cap {c['max_iters']}); iterations {c['iterations']}; final residual {c['residual']}",
        )
    if "contraction_report" in card:
        from ..contraction import summary_line

        table.add_row("contraction report", summary_line(card["contraction_report"]))
    console.print(table)


def info(
    model: str = typer.Argument(..., help="Checkpoint file or registered model name."),
    as_json: bool = typer.Option(False, "--json", help="Print the card as JSON."),
    no_check: bool = typer.Option(False, "--no-check", help="Skip the measured contraction check."),
) -> None:
    """Print a model card: architecture, parameters, config, metadata, measured contraction."""
    from ..modelcard import model_card
    from ..sources import resolve_model

    m, source = resolve_model(model)
    card = model_card(m, source, check=not no_check)
    from ..flops import step_gflop
    from ..modelcard import ModelCard

    size = ModelCard.of(m).image_size
    card["flops"] = {"image_size": size, "gflop_per_step": step_gflop(m, size, size)}
    if as_json:
        typer.echo(json.dumps(card, indent=2))
    else:
        print_card(card)


def list_cmd() -> None:
    """List registered model architectures."""
    from ..models import get_entry, list_models

    for name in list_models():
        typer.echo(f"{name}\t{get_entry(name).description}")


def create(
    name: str = typer.Argument(..., help="Registered model name."),
    out: Path = typer.Option(..., "--out", help="Checkpoint file to write."),
    config: Optional[str] = typer.Option(None, "--config", help="JSON object of config overrides."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Build a registered model with random weights and save it as a checkpoint."""
    import torch

    from .. import checkpoint
    from ..models import create_model

    overrides = json_object(config, "--config")
    torch.manual_seed(seed)
    model = create_model(name, overrides)
    path = checkpoint.save(model, out, meta={"training": "none (random init)", "seed": seed})
    typer.echo(f"wrote {path}")
