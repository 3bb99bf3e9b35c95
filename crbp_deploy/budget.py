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


#: The halting policies (models/halting.py says what each watches); "tol" is convergence alone.
POLICIES = ("tol", "estimate", "stable", "learned")
MAX_PATIENCE = 100
FIELDS = ("iters", "max_iters", "tol", "policy", "threshold", "patience")


def _known(values: Mapping[str, Any]) -> None:
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise InputError(f"unknown budget key(s) {', '.join(unknown)}; valid: {', '.join(FIELDS)}")


def check_policy(policy: str, threshold: float | None, patience: int, early_exit: bool) -> None:
    """Reject an unknown policy or a parameter it cannot take, naming the valid ones."""
    if policy not in POLICIES:
        raise InputError(f"unknown halting policy {policy!r}; valid: {', '.join(POLICIES)}")
    if policy == "tol":
        if threshold is not None or patience != 1:
            raise InputError("the tol policy takes no threshold or patience (it stops on relative change <= tol)")
        return
    if not early_exit:
        raise InputError(f"the {policy} policy halts early: give max_iters and tol, not iters")
    if not (isinstance(threshold, (int, float)) and not isinstance(threshold, bool) and math.isfinite(threshold)
            and threshold >= 0):
        raise InputError(f"the {policy} policy needs threshold, a finite number >= 0, got {threshold!r}")
    if policy == "learned" and not 0 < threshold <= 1:
        raise InputError(f"the learned policy's threshold is a probability in (0, 1], got {threshold!r}")
    if isinstance(patience, bool) or not isinstance(patience, int) or not 1 <= patience <= MAX_PATIENCE:
        raise InputError(f"patience must be an integer in 1..{MAX_PATIENCE}, got {patience!r}")


@dataclass(frozen=True)
class Budget:
    """A validated iteration budget: `iters` (fixed count) or `max_iters` + `tol` (early exit), and for
    early exit the halting `policy` with its `threshold` and `patience` (steps in a row it must fire)."""

    iters: int | None = None
    max_iters: int | None = None
    tol: float | None = None
    policy: str = "tol"
    threshold: float | None = None
    patience: int = 1
    DEFAULT: ClassVar["Budget"]

    def __post_init__(self) -> None:
        check_budget(self.iters, self.max_iters, self.tol)
        check_policy(self.policy, self.threshold, self.patience, self.early_exit)

    @property
    def early_exit(self) -> bool:
        return self.max_iters is not None

    def kwargs(self) -> dict[str, Any]:
        if not self.early_exit:
            return {"iters": self.iters}
        out: dict[str, Any] = {"max_iters": self.max_iters, "tol": float(self.tol)}
        if self.policy != "tol":
            out.update(policy=self.policy, threshold=float(self.threshold), patience=self.patience)
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "Budget":
        _known(values)
        return cls(**{k: values[k] for k in FIELDS if values.get(k) is not None})

    def early(self, fallback: "Budget | None" = None) -> "Budget":
        """This budget if it exits early, else `fallback` (if it does), else the default."""
        return self if self.early_exit else fallback if fallback is not None and fallback.early_exit else self.DEFAULT

    def merge(self, request: Mapping[str, Any]) -> "Budget":
        """`iters` asks for a fixed count; the early-exit keys override this budget's one by one (over the
        default if this one is a fixed count). A request naming another policy brings its own threshold;
        `policy="tol"` drops the policy. None means "not given"."""
        given = {k: v for k, v in request.items() if v is not None}
        _known(given)
        if "iters" in given:
            extra = sorted(set(given) - {"iters"})
            if extra:
                raise InputError(f"give either iters=N (fixed steps) or {', '.join(extra)} (early exit), not both")
            return Budget(iters=given["iters"])
        if not given:
            return self
        base = self.early()
        values = {k: getattr(base, k) for k in ("max_iters", "tol", "policy", "threshold", "patience")}
        if given.get("policy", base.policy) != base.policy:
            values.update(threshold=None, patience=1)
        values.update(given)
        return Budget(**values)


Budget.DEFAULT = Budget(max_iters=DEFAULT_MAX_ITERS, tol=DEFAULT_TOL)

