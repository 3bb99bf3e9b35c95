"""CLI command groups, one module per capability; each module has `register(app)`."""
from __future__ import annotations

import typer


def json_object(text: str | None, option: str) -> dict:
    """A CLI option holding a JSON object of overrides; a clear ConfigError otherwise."""
    import json

    from ..errors import ConfigError

    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{option} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{option} must be a JSON object")
    return value


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
