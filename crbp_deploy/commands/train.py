"""CLI commands of this capability (placeholders until it is built)."""
from . import stub


def register(app) -> None:
    stub(app, "train", 3, "Train with BPTT / C-BPTT / RBP / C-RBP.")
