"""`crbp-deploy`: a thin command-line layer over the library."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import CrbpError

app = typer.Typer(
    help="Take recurrent segmenters trained with C-RBP to production.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
_state = {"debug": False}


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    _state["debug"] = debug


def resolve_model(spec: str | None):
    """A checkpoint path, a bundled model's name, or a registered architecture (random weights)."""
    from . import checkpoint, zoo
    from .models import create_model, list_models

    spec = spec or zoo.DEFAULT
    if Path(spec).exists() or spec.endswith(".pt"):
        return checkpoint.load(spec), str(spec)
    if spec in zoo.names():
        return zoo.load(spec), f"bundled:{spec}"
    if spec in list_models():
        return create_model(spec), f"registry:{spec}"
    raise CrbpError(
        f"{spec!r} is not a checkpoint file, a bundled model ({', '.join(zoo.names()) or 'none'}) "
        f"or a registered architecture ({', '.join(list_models())})"
    )


def print_card(card: dict) -> None:
    table = Table(title=f"model card: {card['architecture']}", show_header=False)
    table.add_column(style="bold cyan")
    table.add_column()
    table.add_row("source", card["source"])
    table.add_row("architecture", card["architecture"])
    table.add_row("parameters", f"{card['parameters']:,}")
    table.add_row("config", json.dumps(card["config"]))
    for key, value in card["meta"].items():
        table.add_row(f"meta.{key}", json.dumps(value) if not isinstance(value, str) else value)
    if "contraction" in card:
        c = card["contraction"]
        table.add_row(
            "contraction check",
            f"{c['converged']}/{c['inputs']} random {c['size']}x{c['size']} inputs reached tol={c['tol']:g} "
            f"(cap {c['max_iters']}); iterations {c['iterations']}; final residual {c['residual']}",
        )
    console.print(table)


@app.command()
def info(
    model: str = typer.Argument(..., help="Checkpoint file or registered model name."),
    as_json: bool = typer.Option(False, "--json", help="Print the card as JSON."),
    no_check: bool = typer.Option(False, "--no-check", help="Skip the measured contraction check."),
) -> None:
    """Print a model card: architecture, parameters, config, metadata, measured contraction."""
    from .card import model_card

    m, source = resolve_model(model)
    card = model_card(m, source, check=not no_check)
    if as_json:
        typer.echo(json.dumps(card, indent=2))
    else:
        print_card(card)


@app.command("list")
def list_cmd() -> None:
    """List registered model architectures."""
    from .models import get_entry, list_models

    for name in list_models():
        typer.echo(f"{name}\t{get_entry(name).description}")


@app.command()
def create(
    name: str = typer.Argument(..., help="Registered model name."),
    out: Path = typer.Option(..., "--out", help="Checkpoint file to write."),
    config: Optional[str] = typer.Option(None, "--config", help="JSON object of config overrides."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Build a registered model with random weights and save it as a checkpoint."""
    import torch

    from . import checkpoint
    from .commands import json_object
    from .models import create_model

    overrides = json_object(config, "--config")
    torch.manual_seed(seed)
    model = create_model(name, overrides)
    path = checkpoint.save(model, out, meta={"training": "none (random init)", "seed": seed})
    typer.echo(f"wrote {path}")


from .commands import register_all  # noqa: E402  (commands need `app`, `console` defined above)

register_all(app)


def main() -> None:
    try:
        app()
    except CrbpError as exc:
        if _state["debug"]:
            raise
        typer.echo(f"error: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
