"""Model cards: what a model is, how big, how it was trained and whether it contracts."""
from __future__ import annotations

from typing import Any

import torch

from .models import RecurrentSegmenter


@torch.no_grad()
def contraction_check(
    model: RecurrentSegmenter, *, inputs: int = 4, size: int = 64, tol: float = 1e-3, max_iters: int = 200, seed: int = 0
) -> dict[str, Any]:
    """Measure iterations to reach `tol` on random inputs: a C-RBP-trained model should converge."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(inputs, model.in_channels, size, size, generator=gen)
    out = model.eval()(images, max_iters=max_iters, tol=tol)
    iters = out["iterations"].tolist()
    return {
        "inputs": inputs,
        "size": size,
        "tol": tol,
        "max_iters": max_iters,
        "iterations": iters,
        "residual": [float(f"{r:.3g}") for r in out["residual"].tolist()],
        "converged": sum(int(r <= tol) for r in out["residual"].tolist()),
    }


def model_card(model: RecurrentSegmenter, source: str, *, check: bool = True) -> dict[str, Any]:
    card: dict[str, Any] = {
        "source": source,
        "architecture": model.arch,
        "parameters": model.num_parameters(),
        "config": model.config.to_dict(),
        "meta": getattr(model, "meta", None) or {"note": "untrained: built from the registry with random weights"},
    }
    if check:
        card["contraction"] = contraction_check(model)
        from .contraction import contraction_report  # ρ(J), ‖J‖, max 1ᵀJ, Neumann terms at the fixed point

        card["contraction_report"] = contraction_report(model)
    return card
