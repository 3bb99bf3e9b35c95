"""The model metrics a served panoptic model reports, declared once for the handler and the server config.

TorchServe's Prometheus mode only exposes backend metrics that its metrics YAML declares (with the
exact dimension names the handler emits), so the handler and `server.metrics_yaml` share this table.
TorchServe 0.12 builds histograms with the Prometheus client's default buckets (0.005 .. 10, not
configurable): right for latencies in seconds; for iteration counts they resolve 1..10 only, so
`BudgetUsed` (iterations / max_iters, in (0, 1]) carries the shape of the distribution and
`IterationsToConverge` its exact mean (`_sum / _count`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: str  # "counter" | "gauge" | "histogram" (TorchServe's MetricTypes values)
    unit: str
    dimensions: tuple[str, ...]
    help: str


MODEL_DIM = "ModelName"
STAGE_DIM = "Stage"
STAGES = ("decode", "model", "postprocess", "encode")

ITERATIONS = MetricSpec("IterationsToConverge", "histogram", "iterations", (MODEL_DIM,),
                        "recurrent steps run per image (early exit)")
BUDGET_USED = MetricSpec("BudgetUsed", "histogram", "fraction", (MODEL_DIM,),
                         "iterations / max_iters per image; 1.0 = the cap was reached")
NOT_CONVERGED = MetricSpec("NotConverged", "counter", "images", (MODEL_DIM,),
                           "images stopped by the cap: the state never fell below tol, nor did the halting "
                           "policy fire, within max_iters")
DIVERGED = MetricSpec("Diverged", "counter", "images", (MODEL_DIM,),
                      "images whose recurrent state turned non-finite (stopped; never counted as converged)")
STAGE_LATENCY = MetricSpec("StageLatency", "histogram", "seconds", (MODEL_DIM, STAGE_DIM),
                           "per-image latency of each stage: decode, model, postprocess, encode")

MODEL_METRICS = (ITERATIONS, BUDGET_USED, NOT_CONVERGED, DIVERGED, STAGE_LATENCY)


def yaml_entries() -> dict[str, list[dict[str, Any]]]:
    """`model_metrics` entries for TorchServe's metrics YAML, grouped by kind."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for spec in MODEL_METRICS:
        grouped.setdefault(spec.kind, []).append(
            {"name": spec.name, "unit": spec.unit, "dimensions": list(spec.dimensions)}
        )
    return grouped
