"""CLI commands, one module per verb (named after it), registered from `VERBS`."""
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


#: (command, module, function), in help order; a module is named after its verb.
VERBS = (("info", "info", "info"), ("list", "info", "list_cmd"), ("create", "info", "create"), ("train", "train", "train"),
         ("eval", "evaluate", "evaluate"), ("predict", "predict", "predict"), ("calibrate", "calibrate", "calibrate"),
         ("export", "export", "export"), ("verify", "export", "verify"), ("bench", "bench", "bench"),
         ("package", "package", "package"), ("serve", "serve", "serve"), ("demo", "demo", "demo"))


def register_all(app: typer.Typer) -> None:
    import importlib

    from . import data

    for command, module, function in VERBS:
        app.command(command)(getattr(importlib.import_module(f"{__name__}.{module}", __name__), function))
    data.register(app)  # a command group
