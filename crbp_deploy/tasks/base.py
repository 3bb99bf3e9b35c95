"""The Task protocol and what every task shares: the registry, the dataset-folder check, iteration statistics.

A Task is everything eval, calibrate, bench, verify and the trainer know about one task: how to open its
data, run a model (or a runtime Backend) on it, score the outputs with one number in points (PQ, or
IoU x 100, so "within 0.5 points" means the same for both), print the result, and train on it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

from ..errors import InputError

#: Images per batch when a task evaluates (the trainer's per-epoch check, Pathfinder's held-out eval).
EVAL_BATCH = 32

#: name (`model.task`) -> its Task; each task module registers its one instance (`crbp_deploy.tasks` imports them).
TASKS: dict[str, "Task"] = {}


@dataclass
class TrainingData:
    """What a task gives the trainer: both splits as in-memory tensors, the model options they imply (the
    user's overrides included) and what the checkpoint's card records about the data."""

    train: dict
    val: dict
    model_config: dict
    meta: dict


class Task(Protocol):
    """One task (panoptic, pathfinder). Held-out data: `open` a split (one InputError for a missing, empty or
    other task's folder) or `generate` one; `runner` wraps a model, or a runtime Backend running it, for
    `evaluate` (the task's full result, with `iterations` statistics); `quality` is its one number in points,
    `details` what a calibration sweep keeps, `report` what `eval` prints; `images` gives bench's latency
    inputs. Training: `training_data` (both splits in memory), `loss` per batch, `train_eval` per epoch."""

    name: str  # the `model.task` that selects it
    metric: str  # the quality's name: "PQ" | "IoU"
    default_model: str  # the registered architecture `train` builds by default
    eval_batch: int  # images per run when scoring held-out data
    parity_images: int  # images of the split `verify` generates for its quality-parity check (0: no such check)
    marker: str  # the file a folder of this task's data holds
    label: str  # "<what the data is> (<marker>)"
    how: str  # how to make such a folder

    def open(self, data: str | os.PathLike, split: str = "val", *, targets: bool = False) -> Any: ...
    def generate(self, folder: Path, count: int, size: int, seed: int) -> Path: ...  # the folder `open` takes
    def runner(self, model, backend=None, source: str | None = None) -> Any: ...
    def evaluate(self, runner, dataset, *, limit: int = 0, batch_size: int | None = None, progress: bool = False,
                 **budget) -> dict[str, Any]: ...
    def quality(self, result: Mapping[str, Any]) -> float: ...
    def details(self, result: Mapping[str, Any]) -> dict[str, Any]: ...
    def report(self, result: Mapping[str, Any], dataset, *, per_class: bool = False) -> list: ...
    def images(self, dataset, count: int) -> np.ndarray: ...  # N x C x H x W float32 in [0, 1]
    # the per-step trace calibrate scores halting on (frontier.py): batches of (images, truth), the counts of
    # one step's heads against the truth, and quality from counts pooled over images (points) or per image
    def trace_io(self, model, dataset, limit: int, batch: int) -> tuple[Any, Any]: ...
    def counts_quality(self, counts: np.ndarray) -> float: ...
    def image_quality(self, counts: np.ndarray) -> np.ndarray: ...
    def training_data(self, cfg) -> TrainingData: ...
    def loss(self, outputs, batch, cfg) -> tuple[Any, dict[str, float]]: ...  # and the numbers the bar shows
    def train_eval(self, model, data: dict, steps: int) -> dict[str, float]: ...


def register(task: "Task") -> "Task":
    TASKS[task.name] = task
    return task


class TaskBase:
    """Shared by the task classes: the empty-dataset check of `open`."""

    def _checked(self, dataset, base: Path):
        if len(dataset) == 0:
            raise InputError(f"{base} holds no images")
        return dataset


def data_folder(task: "Task", data: str | os.PathLike, split: str = "val") -> Path:
    """The folder holding `task`'s data: `data` itself or `data/split` (as `crbp-deploy data ...` writes
    it); one InputError for a missing folder, one without the data, or one with another task's data."""
    root = Path(data)
    if not root.is_dir():
        raise InputError(f"{root}: no such dataset folder: give {task.how}")
    for base in (root, root / split):
        for other in TASKS.values():
            if (base / other.marker).is_file():
                if other is not task:
                    raise InputError(f"{data} holds {other.label}, but the model is a {task.name} segmenter: give {task.how}")
                return base
    raise InputError(f"{data} holds no {task.label.split(' (')[0]} (no {task.marker} in it or in {split}/): give {task.how}")


def iteration_stats(iterations: Sequence[int], converged: Sequence[bool]) -> dict[str, float]:
    it = np.asarray(iterations, dtype=np.float64)
    return {
        "mean": float(it.mean()),
        "median": float(np.median(it)),
        "p90": float(np.percentile(it, 90)),
        "min": int(it.min()),
        "max": int(it.max()),
        "converged_fraction": float(np.mean(converged)),
    }


def iteration_line(it: Mapping[str, Any]) -> str:
    """"iterations: mean, median, p90, range; converged %", the start of `eval`'s last line."""
    return (f"iterations: mean {it['mean']:.1f}, median {it['median']:.0f}, p90 {it['p90']:.0f}, "
            f"range {it['min']}..{it['max']}; converged {100 * it['converged_fraction']:.0f}%")


def first(dataset, limit: int) -> int:
    """How many images an evaluation of the first `limit` (0 = all) takes; none is an InputError."""
    n = min(len(dataset), limit) if limit else len(dataset)
    if n == 0:
        raise InputError("the dataset holds no images")
    return n
