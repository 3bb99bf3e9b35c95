"""The iteration budget: `iters` (a fixed count) or `max_iters` + `tol` (early exit), with ONE default.

A model card records the budget its model was calibrated at (`inference.budget`); `Budget.DEFAULT`
is only the fallback for a card that records none (the bundled model's card holds its own).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from .errors import InputError

#: The largest iteration budget any run accepts; more is a mistake, not a request.
MAX_ITERATIONS = 10_000
#: The one default: run until converged (relative state change <= tol), with a cap.
DEFAULT_MAX_ITERS = 60
DEFAULT_TOL = 1e-3


def check_budget(iters: int | None, max_iters: int | None, tol: float | None) -> None:
    """Reject impossible run options with a message naming the option."""
    if (iters is None) == (max_iters is None):
        raise InputError("give exactly one of iters=N (fixed steps) or max_iters=M (early exit)")
    n = iters if iters is not None else max_iters
    label = "iters" if iters is not None else "max_iters"
    if isinstance(n, bool) or not isinstance(n, int):
        raise InputError(f"{label} must be an integer, got {n!r}")
    if not 1 <= n <= MAX_ITERATIONS:
        raise InputError(f"{label}={n} is outside 1..{MAX_ITERATIONS}")
    if iters is not None and tol is not None:
        raise InputError("tol only applies to early exit (max_iters=M)")
    if max_iters is not None:
        if tol is None:
            raise InputError("early exit needs tol (relative state change at which to stop)")
        if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol >= 0):
            raise InputError(f"tol must be a finite number >= 0, got {tol!r}")


@dataclass(frozen=True)
class Budget:
    """A validated iteration budget: `iters` (fixed count) or `max_iters` + `tol` (early exit)."""

    iters: int | None = None
    max_iters: int | None = None
    tol: float | None = None
    DEFAULT: ClassVar["Budget"]

    def __post_init__(self) -> None:
        check_budget(self.iters, self.max_iters, self.tol)

    @property
    def early_exit(self) -> bool:
        return self.max_iters is not None

    def kwargs(self) -> dict[str, Any]:
        if self.early_exit:
            return {"max_iters": self.max_iters, "tol": float(self.tol)}
        return {"iters": self.iters}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "Budget":
        return cls(**{k: values[k] for k in ("iters", "max_iters", "tol") if values.get(k) is not None})

    @classmethod
    def from_card(cls, card: Any) -> "Budget":
        """The budget a model card records (a ModelCard, a card dict or a model), else the default."""
        from .modelcard import ModelCard

        recorded = ModelCard.of(card).inference.get("budget")
        return cls.from_dict(recorded) if recorded else cls.DEFAULT

    def early(self, fallback: "Budget | None" = None) -> "Budget":
        """This budget if it exits early, else `fallback` (if it does), else the default."""
        return self if self.early_exit else fallback if fallback is not None and fallback.early_exit else self.DEFAULT

    def merge(self, request: Mapping[str, Any]) -> "Budget":
        """`iters` asks for a fixed count; `max_iters`/`tol` override the early-exit values one by one
        (over this budget if it exits early, else over the default). None means "not given"."""
        given = {k: v for k, v in request.items() if v is not None}
        if "iters" in given:
            return Budget(iters=given["iters"])
        if not given:
            return self
        base = self.early()
        return Budget(max_iters=given.get("max_iters", base.max_iters), tol=given.get("tol", base.tol))


Budget.DEFAULT = Budget(max_iters=DEFAULT_MAX_ITERS, tol=DEFAULT_TOL)


def model_budget(card: Any) -> dict[str, Any]:
    """The budget a model card records, else the default, as keyword arguments."""
    return Budget.from_card(card).kwargs()


def merge_budget(default: Mapping[str, Any], request: Mapping[str, Any]) -> dict[str, Any]:
    """`Budget.merge` on keyword-argument dicts."""
    return Budget.from_dict(default).merge(request).kwargs()
