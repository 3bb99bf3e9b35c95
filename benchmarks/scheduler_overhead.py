"""What the iteration-level scheduler costs and buys on a closed batch of bundled-model scenes.

Arms, each over the same N held-out scenes at the card's image size, torch at 1 thread:
- `batched`: model.run on batches of `slots` (the solver's compact active set: a batch costs the sum of
  its iterations, but returns when its slowest scene is done) -- the request-level reference;
- `request`: Scheduler(mode="request", slots) -- the same batching through the scheduler's slots;
- `iteration`: Scheduler(mode="iteration", slots) -- scenes join and leave between steps.

Reported per arm: wall time, row-steps (sum of iterations), ms per row-step (the scheduler's per-tick
bookkeeping shows here as the difference to `batched`), and mean / p50 latency of a scene from the start
(all scenes are submitted at t=0). It also checks every scheduled scene's iterations against its solo run.
Arms alternate within each repeat (load changes fall on all); the best repeat of each arm is kept.

    python benchmarks/scheduler_overhead.py --count 32 --slots 8 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time

import numpy as np
import torch


def scenes(count: int, size: int) -> list[np.ndarray]:
    from crbp_deploy.data.panoptic_synth import generate_sample

    return [generate_sample(10_000 + i, 7, size)[0].astype(np.float32) / 255.0 for i in range(count)]


@torch.no_grad()
def batched(model, images, budget, slots):
    started, latency, iterations = time.perf_counter(), [], []
    for i in range(0, len(images), slots):
        x = torch.from_numpy(np.stack(images[i : i + slots])).permute(0, 3, 1, 2).contiguous()
        out = model.run(x, **budget)
        iterations += [int(n) for n in out["iterations"]]
        latency += [time.perf_counter() - started] * x.shape[0]
    return time.perf_counter() - started, latency, iterations


def scheduled(stepper, images, slots, mode):
    from crbp_deploy.serving.scheduler import Scheduler

    scheduler = Scheduler(stepper, slots=slots, mode=mode, max_queue=len(images))
    started = time.perf_counter()
    tickets = [scheduler.submit(image) for image in images]
    latency = {}
    while len(latency) < len(tickets):
        scheduler.tick()
        now = time.perf_counter()
        latency.update({i: now - started for i, t in enumerate(tickets) if i not in latency and t.done()})
    iterations = [t.result().iterations for t in tickets]
    return time.perf_counter() - started, [latency[i] for i in range(len(tickets))], iterations


def cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="crbp-panoptic")
    parser.add_argument("--count", type=int, default=32)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from crbp_deploy.modelcard import ModelCard
    from crbp_deploy.runtime.stepper import load_stepper

    stepper = load_stepper(args.model, "torch", threads=1)
    model, budget = stepper.model, stepper.default_budget.kwargs()
    images = scenes(args.count, ModelCard.of(stepper.model).image_size)
    solo = batched(model, images, budget, 1)[2]
    arms = {"batched": lambda: batched(model, images, budget, args.slots),
            "request": lambda: scheduled(stepper, images, args.slots, "request"),
            "iteration": lambda: scheduled(stepper, images, args.slots, "iteration")}
    best: dict[str, tuple] = {}
    for _ in range(args.repeats):
        for name, arm in arms.items():
            result = arm()
            assert result[2] == solo, f"{name}: per-scene iterations differ from the solo runs"
            if name not in best or result[0] < best[name][0]:
                best[name] = result
    steps = sum(solo)
    rows = {name: {"wall_s": round(wall, 3), "row_steps": steps, "ms_per_row_step": round(1000 * wall / steps, 3),
                   "latency_mean_s": round(float(np.mean(lat)), 3), "latency_p50_s": round(float(np.median(lat)), 3)}
            for name, (wall, lat, _) in best.items()}
    base = rows["batched"]
    for row in rows.values():
        row["wall_vs_batched"] = round(row["wall_s"] / base["wall_s"], 3)
        row["p50_vs_batched"] = round(row["latency_p50_s"] / base["latency_p50_s"], 3)
    print(json.dumps({"cpu": cpu(), "torch_threads": torch.get_num_threads(), "model": args.model,
                      "count": args.count, "slots": args.slots, "budget": budget,
                      "iterations": {"min": min(solo), "median": float(np.median(solo)), "max": max(solo)},
                      "iterations_identical_to_solo": True, "arms": rows}, indent=2))


if __name__ == "__main__":
    main()
