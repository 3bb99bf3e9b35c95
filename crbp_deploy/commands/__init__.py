"""CLI commands, one module per verb (named after it); each module has `register(app)`."""
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


def register_all(app: typer.Typer) -> None:
    from . import bench, calibrate, data, demo, evaluate, export, info, package, predict, serve, train

    for module in (info, data, train, evaluate, predict, calibrate, export, bench, package, serve, demo):
        module.register(app)
