"""`crbp-deploy`: a thin command-line layer over the library."""
from __future__ import annotations

import sys

import typer

from .commands import register_all
from .errors import CrbpError

app = typer.Typer(
    help="Take recurrent segmenters trained with C-RBP to production.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
_state = {"debug": False}


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    _state["debug"] = debug


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
