"""Model registry and the recurrent-segmenter contract; importing this registers every model."""
from .contract import MAX_ITERATIONS, RecurrentSegmenter
from .solver import fixed_point, relative_change
from . import solver
from .registry import create_model, get_entry, list_models, register_model
from . import panoptic, pathfinder, public_hgru  # noqa: F401  (registers the models)

__all__ = [
    "MAX_ITERATIONS",
    "RecurrentSegmenter",
    "create_model",
    "fixed_point",
    "get_entry",
    "list_models",
    "register_model",
    "relative_change",
    "solver",
]
