"""One quality number per budget, whatever the task: PQ for panoptic models, IoU for Pathfinder ones.

`eval`, `calibrate` and `bench` all ask the same question -- how good is this model (or exported
artifact) on held-out data at this iteration budget, and how many iterations does it spend -- so
they share one `Scorer`: `scorer.evaluate(**budget)` gives the task's full result and
`scorer.quality(result)` its headline number in points (PQ, or IoU x 100), so a "within 0.5 points"
rule means the same for both tasks.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from .errors import InputError

TASKS = ("panoptic", "pathfinder")


def model_task(model) -> str:
    """"panoptic" or "pathfinder": what a model is scored on (its class says; a card with categories is panoptic)."""
    task = getattr(model, "task", None)
    if task in TASKS:
        return task
    if "categories" in (getattr(model, "meta", None) or {}):
        return "panoptic"
    raise InputError(f"{type(model).__name__} is neither a panoptic nor a Pathfinder model: nothing to score it on")


@dataclass
class Scorer:
    """Evaluates one runner (a model or a runtime Backend) on one held-out dataset."""

    task: str
    metric: str  # "PQ" or "IoU"
    evaluate: Callable[..., dict[str, Any]]  # (**budget) -> the task's full result
    images: int
    data: str
    details: Callable[[dict[str, Any]], dict[str, Any]] = field(default=lambda result: {})

    def quality(self, result: Mapping[str, Any]) -> float:
        """The headline number in points: PQ (already 0-100) or IoU x 100."""
        return float(result["pq"]["all"]) if self.task == "panoptic" else 100.0 * float(result["iou"])

    @staticmethod
    def mean_iterations(result: Mapping[str, Any]) -> float:
        return float(result["iterations"]["mean"])

    @classmethod
    def panoptic(cls, predictor, dataset, *, data: str = "", limit: int = 0, batch_size: int = 16,
                 progress: bool = False) -> "Scorer":
        from .panoptic.evaluate import evaluate_predictor

        def evaluate(**budget):
            return evaluate_predictor(predictor, dataset, batch_size=batch_size, progress=progress, limit=limit, **budget)

        def details(result):
            return {"pq_things": result["pq"].get("things"), "pq_stuff": result["pq"].get("stuff")}

        n = min(len(dataset), limit) if limit else len(dataset)
        return cls("panoptic", "PQ", evaluate, n, data, details)

    @classmethod
    def pathfinder(cls, run, folder, *, data: str = "", limit: int = 0, batch_size: int = 32,
                   progress: bool = False) -> "Scorer":
        from .pathfinder_eval import evaluate_segmenter

        def evaluate(**budget):
            return evaluate_segmenter(run, folder, batch_size=batch_size, limit=limit, progress=progress, **budget)

        def details(result):
            return {
                "f1": result["f1"],
                "per_length": {n: {"iou": r["iou"], "mean_iterations": r["mean_iterations"]}
                               for n, r in result["per_length"].items()},
                "spearman_length_iterations": result["spearman_length_iterations"],
            }

        n = min(len(folder), limit) if limit else len(folder)
        return cls("pathfinder", "IoU", evaluate, n, data, details)


def open_data(task: str, data: str | os.PathLike, split: str = "val"):
    """The held-out dataset for a task, with one clear error for a missing, empty or mismatched folder."""
    from .pathfinder_eval import find_data, open_pathfinder

    if task == "pathfinder":
        return open_pathfinder(data, split)
    from .panoptic.evaluate import open_dataset

    kind, _ = find_data(data, split)
    if kind == "pathfinder":
        raise InputError(
            f"{data} holds Pathfinder data (index.json), but the model is a panoptic segmenter: "
            "give a COCO panoptic folder (annotations.json, images/, panoptic/)"
        )
    if kind is None:
        raise InputError(
            f"{data} holds no COCO panoptic data (no annotations.json in it or in {split}/): "
            "write one with `crbp-deploy data panoptic`"
        )
    dataset = open_dataset(data, split)
    if len(dataset) == 0:
        raise InputError(f"{data} holds no images")
    return dataset


def scorer_for(model, data: str | os.PathLike, *, split: str = "val", limit: int = 0, backend=None,
               progress: bool = False, **kwargs: Any) -> Scorer:
    """A Scorer for `model` (or, with `backend`, for that runtime running it; `model` then gives the
    card) on held-out data. Checks model and data before any work: one InputError for a mismatch."""
    task = model_task(model)
    meta = getattr(model, "meta", None) or {}
    dataset = open_data(task, data, split)
    if task == "pathfinder":
        from .pathfinder_eval import model_runner

        if backend is not None:
            def run(images, **budget):
                return backend.run(images.numpy(), **budget).outputs
        else:
            run = model_runner(model)
        return Scorer.pathfinder(run, dataset, data=str(data), limit=limit, progress=progress, **kwargs)
    from .panoptic.predict import PanopticPredictor

    if "categories" not in meta:
        raise InputError("this panoptic model's card lists no categories: only a trained panoptic model can be scored")
    if backend is not None:
        predictor = PanopticPredictor.from_backend(backend, meta)
        predictor.stride = int(getattr(model, "stride", predictor.stride))
    else:
        predictor = PanopticPredictor.from_model(model)
    return Scorer.panoptic(predictor, dataset, data=str(data), limit=limit, progress=progress, **kwargs)


def resolve_budget(model, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The budget a run uses: the options given (None = not given), the rest from the card, as predict does."""
    from .models import check_budget
    from .panoptic.predict import merge_budget, model_budget

    budget = merge_budget(model_budget(getattr(model, "meta", None)), dict(given or {}))
    check_budget(budget.get("iters"), budget.get("max_iters"), budget.get("tol"))
    return budget
