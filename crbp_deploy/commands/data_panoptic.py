"""`crbp-deploy data panoptic` (placeholder until built)."""
import typer

from . import not_built


def panoptic(ctx: typer.Context) -> None:
    """Generate the panoptic dataset (not built yet)."""
    not_built("data panoptic", 4)
