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


def budget_options(iters: Optional[int], max_iters: Optional[int], tol: Optional[float], policy: Optional[str] = None,
                   threshold: Optional[float] = None, patience: Optional[int] = None) -> dict:
    """--iters / --max-iters / --tol / --policy / --threshold / --patience as the budget keys that were given
    (fixed count or early exit, not both)."""
    early = {"max_iters": max_iters, "tol": tol, "policy": policy, "threshold": threshold, "patience": patience}
    if iters is not None and any(v is not None for v in early.values()):
        raise CrbpError("give --iters (fixed count) or --max-iters/--tol/--policy (early exit), not both")
    return {k: v for k, v in {"iters": iters, **early}.items() if v is not None}


POLICY_HELP = "Halting policy: tol | estimate | stable | learned (default: the card's)."
