"""One Task per task (`base.Task`): `TASKS[model.task]` knows its data, runner, score and training. `eval`,
`calibrate` and `bench` share one `Scorer`: `scorer.evaluate(**budget)` gives the task's full result on held-out
data, `scorer.quality(result)` its headline number in points (PQ, or IoU x 100)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from ..errors import InputError
from .base import EVAL_BATCH, TASKS, Task, data_folder
from .pathfinder import PATHFINDER  # registered first: the order `train --task` lists  # isort: skip
from .panoptic import PANOPTIC  # isort: skip

__all__ = ["EVAL_BATCH", "PANOPTIC", "PATHFINDER", "TASKS", "Scorer", "Task", "data_folder", "scorer_for", "task_of"]


def task_of(model) -> Task:
    """The Task a model is scored and trained on (`TASKS[model.task]`)."""
    task = TASKS.get(getattr(model, "task", None))
    if task is None:
        raise InputError(f"{type(model).__name__} is neither a panoptic nor a Pathfinder model: nothing to score it on")
    return task


@dataclass
class Scorer:
    """Evaluates one runner (a model or a runtime Backend) on one held-out dataset."""

    task: str
    metric: str  # "PQ" or "IoU"
    evaluate: Callable[..., dict[str, Any]]  # (**budget) -> the task's full result
    images: int
    data: str
    dataset: Any = None

    def quality(self, result: Mapping[str, Any]) -> float:
        """The headline number in points: PQ (already 0-100) or IoU x 100."""
        return TASKS[self.task].quality(result)

    def details(self, result: Mapping[str, Any]) -> dict[str, Any]:
        return TASKS[self.task].details(result)

    @staticmethod
    def mean_iterations(result: Mapping[str, Any]) -> float:
        return float(result["iterations"]["mean"])


def scorer_for(model, data: str | os.PathLike, *, split: str = "val", limit: int = 0, backend=None,
               progress: bool = False, batch_size: int | None = None, source: str | None = None) -> Scorer:
    """A Scorer for `model` (or, with `backend`, for that runtime running it; `model` then gives the
    card) on held-out data. Checks model and data before any work: one InputError for a mismatch."""
    task = task_of(model)
    runner = task.runner(model, backend, source)
    dataset = task.open(data, split)

    def evaluate(**budget):
        return task.evaluate(runner, dataset, limit=limit, batch_size=batch_size, progress=progress, **budget)

    n = min(len(dataset), limit) if limit else len(dataset)
    return Scorer(task.name, task.metric, evaluate, n, str(data), dataset)
