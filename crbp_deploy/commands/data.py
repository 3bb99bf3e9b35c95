"""CLI commands of this capability (placeholders until it is built)."""
from . import stub


def register(app) -> None:
    stub(app, "data", 3, "Generate datasets (Pathfinder, synthetic panoptic).")
