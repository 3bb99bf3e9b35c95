"""The recurrent-segmenter contract every deployable model implements.

A model is split into `encode` (once per input), `init_state`, `step` (one application of F,
no per-step parameters) and `readout`. Training (RBP needs one recorded step), export (encoder
-> Loop(step) -> readout) and serving all build on these four parts.
"""
from __future__ import annotations

from torch import Tensor, nn

from ..budget import MAX_ITERATIONS, Budget  # noqa: F401  (MAX_ITERATIONS re-exported: the contract's limit)
from ..config import StrictConfig
from ..errors import InputError
from .solver import fixed_point, split_budget


class RecurrentSegmenter(nn.Module):
    """Base class: subclasses implement encode / init_state / step / readout."""

    arch: str = ""  # set by @register_model
    in_channels: int = 3
    recurrent: bool = True  # False for feed-forward baselines whose step is the identity
    # `halting_head`: the learned halting policy's head, a submodule once fitted (halting_fit.py); read it with
    # getattr(model, "halting_head", None) -- a class default would shadow the registered submodule.

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
        policy: str | None = None,
        threshold: float | None = None,
        patience: int | None = None,
    ) -> dict[str, Tensor]:
        """`iters=N`: N steps. `max_iters=M, tol=eps`: per sample until relative change <= eps, the halting
        `policy` (models/halting.py) fires `patience` steps in a row at `threshold`, or M steps.

        Returns the readout heads plus `iterations` (int64 [B]) and `residual` (float32 [B], the
        relative state change of each sample's last step; non-finite where the sample diverged).
        `execution="compact"` steps only the samples still running (a batch costs the sum of its
        iterations); "masked" steps every row and freezes converged ones (see solver.py).
        """
        given = {"iters": iters, "max_iters": max_iters, "tol": tol, "policy": policy, "threshold": threshold,
                 "patience": patience}
        budget = Budget.from_dict(given)  # every budget rule lives in Budget
        self.check_images(images)
        return self.run(images, execution=execution, **budget.kwargs())

    def run(self, images: Tensor, *, execution: str = "compact", **budget) -> dict[str, Tensor]:
        """encode -> solve -> readout, unchecked (`forward` validates; exporters trace this)."""
        budget, halting = split_budget(self, budget)
        ctx = self.encode(images)
        h, stats = fixed_point(self.step, ctx, self.init_state(ctx), execution=execution, halting=halting, **budget)
        out = self.readout(ctx, h)
        out["iterations"] = stats.iterations
        out["residual"] = stats.residual
        return out

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
