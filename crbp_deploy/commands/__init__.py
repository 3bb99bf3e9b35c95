"""CLI commands, one module per verb (named after it), registered from `VERBS`."""
from __future__ import annotations

import typer


#: (command, module, function), in help order; a module is named after its verb.
VERBS = (("info", "info", "info"), ("list", "info", "list_cmd"), ("create", "info", "create"),
         ("import", "import_model", "import_model"), ("train", "train", "train"),
         ("eval", "evaluate", "evaluate"), ("predict", "predict", "predict"), ("calibrate", "calibrate", "calibrate"),
         ("export", "export", "export"), ("verify", "export", "verify"), ("bench", "bench", "bench"),
         ("package", "package", "package"), ("serve", "serve", "serve"), ("demo", "demo", "demo"))


def register_all(app: typer.Typer) -> None:
    import importlib

    from . import data

    for command, module, function in VERBS:
        app.command(command)(getattr(importlib.import_module(f"{__name__}.{module}", __name__), function))
    data.register(app)  # a command group
