"""The model card a checkpoint or an artifact carries: typed, after timm's PretrainedCfg; and the card a
user reads (`info`, the export sidecar): what a model is, how big, how it was trained, whether it contracts.

Stored as plain JSON (`meta` in a checkpoint, `model.meta` in an ONNX sidecar); `ModelCard.of`
reads any of them, old files included: keys this version does not type are kept in `extra`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Mapping

import torch

from .budget import Budget
from .config import StrictConfig


@dataclass(frozen=True)
class ModelCard(StrictConfig):
    categories: tuple[dict, ...] = ()  # COCO categories (panoptic models)
    inference: dict = field(default_factory=dict)  # {"budget": ..., "postprocess": ..., "calibration": ...}
    training: Any = None  # the training record (TrainConfig + progress), or a note
    evaluation: dict = field(default_factory=dict)  # held-out results, evaluation image_size
    extra: dict = field(default_factory=dict)  # everything else recorded (data, metrics, history, ...)

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any] | None) -> "ModelCard":
        """A stored card; unknown keys go to `extra` (old and newer files load), null values are left out."""
        typed = {f.name for f in fields(cls)} - {"extra"}
        meta = {k: v for k, v in (meta or {}).items() if v is not None}
        return cls.from_dict({k: v for k, v in meta.items() if k in typed},
                             extra={k: v for k, v in meta.items() if k not in typed})

    @classmethod
    def of(cls, source: Any) -> "ModelCard":
        """The card of a ModelCard, a card dict, None (empty) or a model (its `.meta`)."""
        if isinstance(source, ModelCard):
            return source
        return cls.from_meta(source if source is None or isinstance(source, Mapping) else getattr(source, "meta", None))

    @property
    def budget(self) -> Budget:
        """The budget this card records (`inference.budget`), else `Budget.DEFAULT`."""
        return resolve_budget(self)

    @property
    def postprocess(self):
        from .panoptic.postprocess import PostprocessConfig

        return PostprocessConfig.from_dict(self.inference.get("postprocess") or {})

    @property
    def image_size(self) -> int:
        return int(self.evaluation.get("image_size", 64))


def resolve_budget(card: Any = None, request: Mapping[str, Any] | None = None, fallback: Budget | None = None) -> Budget:
    """The one answer to "which budget does this run use": the request, over the budget the card
    records (`inference.budget`), over `fallback` (an exported artifact's defaults), over `Budget.DEFAULT`.
    A card without a policy (older checkpoints) runs the `tol` policy."""
    recorded = ModelCard.of(card).inference.get("budget")
    base = Budget.from_dict(recorded) if recorded else fallback or Budget.DEFAULT
    return base.merge(dict(request or {}))


@torch.no_grad()
def contraction_check(
    model, *, inputs: int = 4, size: int = 64, tol: float = 1e-3, max_iters: int = 200, seed: int = 0
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


def model_card(model, source: str, *, check: bool = True) -> dict[str, Any]:
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
