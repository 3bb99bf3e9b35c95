"""PyTorch eager backend: the reference every exported artifact is verified against."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import InputError
from ..models import RecurrentSegmenter
from .base import Backend, Budget


class TorchBackend(Backend):
    """Runs the model's own `forward`; takes both fixed (`iters`) and early-exit budgets.

    `threads` sets torch's intra-op threads (process-wide, as torch has no per-model setting).
    """

    name = "torch"
    strategy = "eager"

    def __init__(
        self,
        model: RecurrentSegmenter,
        *,
        device: str | torch.device = "cpu",
        threads: int | None = None,
        iters: int | None = None,
        max_iters: int | None = None,
        tol: float | None = None,
    ):
        if not isinstance(model, RecurrentSegmenter):
            raise InputError(f"TorchBackend needs a RecurrentSegmenter, got {type(model).__name__}")
        if threads is not None:
            if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
                raise InputError(f"threads must be a positive integer, got {threads!r}")
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.in_channels = model.in_channels
        self.size_multiple = int(getattr(model, "stride", 1) or 1)
        self.default_budget = Budget(iters=iters, tol=tol) if iters is not None else Budget.DEFAULT.merge(
            {"max_iters": max_iters, "tol": tol})

    def describe_artifact(self) -> str:
        return f"the torch model {self.model.arch or type(self.model).__name__}"

    @torch.no_grad()
    def _infer(self, images, budget: Budget) -> dict[str, np.ndarray]:
        x = torch.as_tensor(images).to(self.device, torch.float32)
        out = self.model(x, **budget.kwargs())
        result = {k: v.detach().cpu().numpy() for k, v in out.items()}
        result["residual"] = result["residual"].astype(np.float32, copy=False)
        return result

    def telemetry_extra(self) -> dict[str, Any]:
        return {"device": str(self.device), "threads": torch.get_num_threads()}
