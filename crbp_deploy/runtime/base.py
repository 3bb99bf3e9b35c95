"""One `Backend` interface for every runtime: `run(images, **budget) -> RunResult`.

verify, bench, predict and the serving handler all talk to this, so a new runtime (TensorRT, ...)
is one subclass implementing `_infer`. The base class owns what must not differ between
runtimes: input validation, budget rules and telemetry.
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch

from ..budget import DEFAULT_MAX_ITERS, DEFAULT_TOL, Budget  # noqa: F401  (re-exported)
from ..errors import InputError
from ..models.solver import stop_reasons

RANGE_SLACK = 1e-3  # resampling overshoot; a 0..255 image is far outside


@dataclass
class RunResult(Mapping):
    """Outputs (heads + `iterations` + `residual`, numpy) and telemetry; indexes like a dict."""

    outputs: dict[str, np.ndarray]
    telemetry: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> np.ndarray:
        return self.outputs[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.outputs)

    def __len__(self) -> int:
        return len(self.outputs)

    @property
    def heads(self) -> dict[str, np.ndarray]:
        return {k: v for k, v in self.outputs.items() if k not in ("iterations", "residual")}


class Backend(ABC):
    """Runs a recurrent segmenter on N x C x H x W float images in [0, 1].

    Subclasses set `name`, `strategy` ("eager", "loop" or "unrolled"), `in_channels`,
    `size_multiple` and `default_budget`, and implement `_infer`.
    """

    name: str = ""
    strategy: str = "eager"
    in_channels: int = 3
    size_multiple: int = 1
    default_budget: Budget

    # --- budget ------------------------------------------------------------------------------
    def resolve_budget(self, iters: int | None = None, max_iters: int | None = None, tol: float | None = None,
                       **rule: Any) -> Budget:
        """Fill what the caller left out from the defaults; reject what this backend cannot run.
        `rule`: policy / threshold / patience (an exported Loop computes one policy: its parameters are
        inputs, the policy itself is not)."""
        default = self.default_budget
        if self.strategy == "unrolled":
            if max_iters is not None or tol is not None or any(v is not None for v in rule.values()):
                raise InputError(
                    f"{self.describe_artifact()} is exported with the unrolled strategy ({default.iters} fixed steps): "
                    "max_iters/tol and halting policies need an artifact exported with strategy=loop"
                )
            if iters is not None and iters != default.iters:
                Budget(iters=iters)  # an impossible count is reported as such first
                raise InputError(
                    f"{self.describe_artifact()} is unrolled for exactly {default.iters} steps, got iters={iters}; "
                    f"re-export with iters={iters} or use a loop artifact"
                )
            return default
        if self.strategy == "loop" and iters is not None:
            raise InputError(
                f"{self.describe_artifact()} is exported with the loop strategy (early exit): give max_iters/tol, "
                f"not iters (max_iters={iters}, tol=0 runs a fixed count)"
            )
        if iters is not None and (max_iters is not None or tol is not None):
            raise InputError("give either iters=N (fixed steps) or max_iters/tol (early exit), not both")
        policy = rule.get("policy")
        if self.strategy == "loop" and policy is not None and policy != default.policy:
            # an impossible request (unknown policy, bad threshold) is reported as such first
            Budget.DEFAULT.merge({"policy": policy, "threshold": rule.get("threshold"), "patience": rule.get("patience")})
            raise InputError(
                f"{self.describe_artifact()} computes the {default.policy} halting policy in its Loop; a request may "
                f"set its threshold and patience, not another policy ({policy}): re-export with --policy {policy}"
            )
        return default.merge({"iters": iters, "max_iters": max_iters, "tol": tol, **rule})

    def budget_for(self, card_budget: Budget) -> Budget:
        """What this backend runs by default for a model whose card records `card_budget`: that budget where
        the backend can run it; an unrolled graph's fixed count; a Loop's own defaults when it computes
        another halting policy than the card's (a Loop exported with `--policy`)."""
        if self.strategy == "unrolled":
            return self.default_budget
        budget = card_budget.early(self.default_budget)
        if self.strategy == "loop" and budget.policy != self.default_budget.policy:
            return self.default_budget
        return budget

    def budget_feeds(self, budget: Budget) -> dict[str, np.ndarray]:
        """The Loop's budget inputs for this call (none for an unrolled graph)."""
        if not budget.early_exit:
            return {}
        feeds = {"max_iters": np.array(budget.max_iters, dtype=np.int64), "tol": np.array(budget.tol, dtype=np.float32)}
        if budget.policy != "tol":
            feeds["threshold"] = np.array(budget.threshold, dtype=np.float32)
            feeds["patience"] = np.array(budget.patience, dtype=np.int64)
        return feeds

    def adopt_artifact(self, meta) -> None:
        """Take strategy, input spec and default budget from an exported artifact's metadata."""
        self.meta = meta
        self.strategy = meta.strategy
        self.in_channels = meta.in_channels
        self.size_multiple = meta.size_multiple
        self.default_budget = meta.budget

    def describe_artifact(self) -> str:
        return f"the {self.name} backend"

    # --- inputs ------------------------------------------------------------------------------
    def check_images(self, images: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Validate shape, dtype and range; return float32 (numpy or tensor, as given)."""
        if isinstance(images, torch.Tensor):
            if not images.is_floating_point():
                raise InputError(f"images must be floating point in [0, 1], got {images.dtype} (divide uint8 by 255)")
            images = images.detach().float()
            lo, hi = (float(images.min()), float(images.max())) if images.numel() else (0.0, 0.0)
            finite = bool(torch.isfinite(images).all())
        elif isinstance(images, np.ndarray):
            if not np.issubdtype(images.dtype, np.floating):
                raise InputError(f"images must be floating point in [0, 1], got {images.dtype} (divide uint8 by 255)")
            images = np.ascontiguousarray(images, dtype=np.float32)
            lo, hi = (float(images.min()), float(images.max())) if images.size else (0.0, 0.0)
            finite = bool(np.isfinite(images).all())
        else:
            raise InputError(f"images must be a numpy array or torch tensor, got {type(images).__name__}")
        shape = tuple(images.shape)
        if len(shape) != 4 or shape[1] != self.in_channels:
            raise InputError(f"images must be N x {self.in_channels} x H x W, got shape {shape}")
        if 0 in shape:
            raise InputError(f"images must not be empty, got shape {shape}")
        if shape[2] % self.size_multiple or shape[3] % self.size_multiple:
            raise InputError(
                f"image size {shape[2]}x{shape[3]} must be a multiple of the model stride {self.size_multiple}"
            )
        if not finite:
            raise InputError("images contain NaN or infinite values")
        if lo < -RANGE_SLACK or hi > 1 + RANGE_SLACK:
            raise InputError(f"images must be in [0, 1], got values in [{lo:.4g}, {hi:.4g}] (divide uint8 by 255)")
        return images

    # --- running -----------------------------------------------------------------------------
    def run(
        self,
        images: np.ndarray | torch.Tensor,
        *,
        iters: int | None = None,
        max_iters: int | None = None,
        tol: float | None = None,
        **rule: Any,
    ) -> RunResult:
        """Heads + `iterations` (int64 [N]) + `residual` (float32 [N]) as numpy, plus telemetry.
        `rule`: the halting policy's policy / threshold / patience."""
        started = time.perf_counter()
        budget = self.resolve_budget(iters, max_iters, tol, **rule)
        images = self.check_images(images)
        ready = time.perf_counter()
        outputs = self._infer(images, budget)
        done = time.perf_counter()
        iterations = outputs["iterations"]
        residual = outputs["residual"]
        telemetry: dict[str, Any] = {
            "backend": self.name,
            "strategy": self.strategy,
            "budget": budget.kwargs(),
            "batch": int(images.shape[0]),
            "size": [int(images.shape[2]), int(images.shape[3])],
            "iterations": [int(i) for i in iterations],
            "residual": [float(r) for r in residual],
            "converged": [bool(r <= budget.tol) for r in residual] if budget.early_exit else None,
            "diverged": [not np.isfinite(r) for r in residual],
            "stopped": stop_reasons(iterations, residual, budget.kwargs()),
            "timings": {
                "total_ms": 1000 * (done - started),
                "prepare_ms": 1000 * (ready - started),
                "inference_ms": 1000 * (done - ready),
            },
        }
        telemetry.update(self.telemetry_extra())
        return RunResult(outputs, telemetry)

    def telemetry_extra(self) -> dict[str, Any]:
        return {}

    @abstractmethod
    def _infer(self, images, budget: Budget) -> dict[str, np.ndarray]:
        """Run validated float32 images; return numpy heads + iterations + residual."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(strategy={self.strategy!r}, default={self.default_budget.kwargs()})"
