"""`crbp-deploy data pathfinder` (placeholder until built)."""
import typer

from . import not_built


def pathfinder(ctx: typer.Context) -> None:
    """Generate the pathfinder dataset (not built yet)."""
    not_built("data pathfinder", 3)
