"""The recurrent-segmenter contract every deployable model implements.

A model is split into `encode` (once per input), `init_state`, `step` (one application of F,
no per-step parameters) and `readout`. Training (RBP needs one recorded step), export (encoder
-> Loop(step) -> readout) and serving all build on these four parts.
"""
from __future__ import annotations

import math

from torch import Tensor, nn

from ..config import StrictConfig
from ..errors import InputError
from .solver import fixed_point

#: The largest iteration budget any run accepts; more is a mistake, not a request.
MAX_ITERATIONS = 10_000


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


class RecurrentSegmenter(nn.Module):
    """Base class: subclasses implement encode / init_state / step / readout."""

    arch: str = ""  # set by @register_model
    in_channels: int = 3
    recurrent: bool = True  # False for feed-forward baselines whose step is the identity

    def __init__(self, config: StrictConfig):
        super().__init__()
        self.config = config

    # --- the four parts --------------------------------------------------------------
    def encode(self, images: Tensor) -> Tensor:
        raise NotImplementedError

    def init_state(self, ctx: Tensor) -> Tensor:
        raise NotImplementedError

    def step(self, ctx: Tensor, h: Tensor) -> Tensor:
        raise NotImplementedError

    def readout(self, ctx: Tensor, h: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    # --- running -----------------------------------------------------------------------
    def check_images(self, images: Tensor) -> None:
        if not isinstance(images, Tensor):
            raise InputError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.dim() != 4 or images.shape[1] != self.in_channels:
            raise InputError(
                f"images must be N x {self.in_channels} x H x W, got shape {tuple(images.shape)}"
            )
        if not images.is_floating_point():
            raise InputError(f"images must be floating point in [0, 1], got {images.dtype}")
        if images.shape[0] == 0 or images.shape[2] < 1 or images.shape[3] < 1:
            raise InputError(f"images must not be empty, got shape {tuple(images.shape)}")

    def forward(
        self,
        images: Tensor,
        iters: int | None = None,
        max_iters: int | None = None,
        tol: float | None = None,
        execution: str = "compact",
    ) -> dict[str, Tensor]:
        """`iters=N`: N steps. `max_iters=M, tol=eps`: per sample until relative change <= eps or M.

        Returns the readout heads plus `iterations` (int64 [B]) and `residual` (float32 [B], the
        relative state change of each sample's last step; non-finite where the sample diverged).
        `execution="compact"` steps only the samples still running (a batch costs the sum of its
        iterations); "masked" steps every row and freezes converged ones (see solver.py).
        """
        check_budget(iters, max_iters, tol)
        self.check_images(images)
        return self.run(images, iters=iters, max_iters=max_iters, tol=tol, execution=execution)

    def run(self, images: Tensor, *, execution: str = "compact", **budget) -> dict[str, Tensor]:
        """encode -> solve -> readout, unchecked (`forward` validates; exporters trace this)."""
        ctx = self.encode(images)
        h, stats = fixed_point(self.step, ctx, self.init_state(ctx), execution=execution, **budget)
        out = self.readout(ctx, h)
        out["iterations"] = stats.iterations
        out["residual"] = stats.residual
        return out

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
