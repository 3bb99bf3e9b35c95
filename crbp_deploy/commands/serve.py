"""CLI commands of this capability (placeholders until it is built)."""
from . import stub


def register(app) -> None:
    stub(app, "package", 6, "Build a TorchServe .mar archive.")
    stub(app, "serve", 6, "Start / stop TorchServe.")
