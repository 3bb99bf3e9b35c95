"""CLI command groups, one module per capability; each module has `register(app)`."""
from __future__ import annotations

import typer


def not_built(command: str, issue: int) -> None:
    typer.echo(f"crbp-deploy {command}: not built yet (tracked in issue #{issue}).", err=True)
    raise typer.Exit(2)


def stub(app: typer.Typer, name: str, issue: int, help: str) -> None:
    """An honest placeholder for a command whose capability is not built yet."""

    def _stub(ctx: typer.Context) -> None:
        not_built(name, issue)

    app.command(name, help=f"{help} (not built yet)", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(_stub)


def register_all(app: typer.Typer) -> None:
    from . import data, demo, evaluate, export, serve, train

    for module in (data, train, evaluate, export, serve, demo):
        module.register(app)
