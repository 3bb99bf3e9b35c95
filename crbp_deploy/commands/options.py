"""Option parsing several commands share (kept out of the package's __init__, which imports the commands)."""
from __future__ import annotations

from typing import Optional

from ..errors import ConfigError, CrbpError


def json_object(text: str | None, option: str) -> dict:
    """A CLI option holding a JSON object of overrides; a clear ConfigError otherwise."""
    import json

    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{option} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{option} must be a JSON object")
    return value


def budget_options(iters: Optional[int], max_iters: Optional[int], tol: Optional[float]) -> dict:
    """--iters / --max-iters / --tol as the budget keys that were given (fixed count or early exit, not both)."""
    if iters is not None and (max_iters is not None or tol is not None):
        raise CrbpError("give --iters (fixed count) or --max-iters/--tol (early exit), not both")
    return {k: v for k, v in {"iters": iters, "max_iters": max_iters, "tol": tol}.items() if v is not None}
