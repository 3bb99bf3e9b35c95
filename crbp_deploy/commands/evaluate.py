"""CLI commands of this capability (placeholders until it is built)."""
from . import stub


def register(app) -> None:
    stub(app, "eval", 4, "Evaluate PQ / IoU on a dataset.")
    stub(app, "predict", 4, "Panoptic predictions for images.")
