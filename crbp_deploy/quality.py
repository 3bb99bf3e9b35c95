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
from pathlib import Path
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


_DATA = {  # what each task reads, and how to make it
    "pathfinder": ("index.json", "Pathfinder data (index.json)", "a folder written by `crbp-deploy data pathfinder`"),
    "panoptic": ("annotations.json", "COCO panoptic data (annotations.json)",
                 "a COCO panoptic folder (annotations.json, images/, panoptic/), e.g. from `crbp-deploy data panoptic`"),
}


def find_data(data: str | os.PathLike, split: str = "val") -> tuple[str | None, Path]:
    """What a dataset folder holds: ("pathfinder" | "panoptic" | None, the folder that holds it).
    A folder counts if it holds the data itself or in SPLIT/ (as `crbp-deploy data ...` writes it)."""
    root = Path(data)
    if not root.is_dir():
        raise InputError(f"{root}: no such dataset folder")
    for base in (root, root / split):
        for task, (marker, _, _) in _DATA.items():
            if (base / marker).is_file():
                return task, base
    return None, root


def data_folder(task: str, data: str | os.PathLike, split: str = "val") -> Path:
    """The folder holding `task`'s data, or one InputError for a missing, empty or other task's folder."""
    kind, base = find_data(data, split)
    marker, label, how = _DATA[task]
    if kind is None:
        raise InputError(f"{data} holds no {label.split(' (')[0]} (no {marker} in it or in {split}/): give {how}")
    if kind != task:
        raise InputError(f"{data} holds {_DATA[kind][1]}, but the model is a {task} segmenter: give {how}")
    return base


def open_data(task: str, data: str | os.PathLike, split: str = "val"):
    """The held-out dataset for a task (see `data_folder` for the checks)."""
    base = data_folder(task, data, split)
    if task == "pathfinder":
        from .data.pathfinder import PathfinderFolder

        dataset = PathfinderFolder(base)
    else:
        from .panoptic.evaluate import open_dataset

        dataset = open_dataset(base)
    if len(dataset) == 0:
        raise InputError(f"{base} holds no images")
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
    from .budget import Budget

    return Budget.from_card(model).merge(dict(given or {})).kwargs()
