"""Scheduled answers against the Loop artifact's solo answers, on the bundled model's held-out scenes.

Needs an export with pieces:

    crbp-deploy export crbp-panoptic --pieces --no-verify --out export/crbp-panoptic-loop.onnx
    OMP_NUM_THREADS=1 python benchmarks/scheduler_parity.py export/crbp-panoptic-loop.onnx --count 12 --slots 4

Each scene goes through the iteration-level scheduler twice (ONNX pieces on onnxruntime, the checkpoint
on torch), sharing steps with the others in the slots; each answer is compared with the Loop artifact
run on that scene alone: per-scene iterations and the largest head difference.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--model", default="crbp-panoptic", help="the checkpoint the artifact came from")
    parser.add_argument("--count", type=int, default=12)
    parser.add_argument("--slots", type=int, default=4)
    args = parser.parse_args()
    from crbp_deploy.data.panoptic_synth import generate_sample
    from crbp_deploy.modelcard import ModelCard
    from crbp_deploy.runtime import load_backend
    from crbp_deploy.runtime.stepper import load_stepper
    from crbp_deploy.serving.scheduler import Scheduler

    loop = load_backend(args.artifact, threads=1)
    steppers = {"onnxruntime pieces": load_stepper(args.artifact, threads=1),
                "torch": load_stepper(args.model, "torch", threads=1)}
    size = ModelCard.of(steppers["torch"].model).image_size
    images = [generate_sample(20_000 + i, 7, size)[0].astype(np.float32) / 255 for i in range(args.count)]
    solo = [loop.run(image.transpose(2, 0, 1)[None].copy()) for image in images]
    report = {"artifact": args.artifact, "count": args.count, "slots": args.slots,
              "loop_iterations": [int(r["iterations"][0]) for r in solo]}
    for name, stepper in steppers.items():
        scheduler = Scheduler(stepper, slots=args.slots, max_queue=args.count)
        started = time.perf_counter()
        outcomes = scheduler.run_all([scheduler.submit(image) for image in images])
        report[name] = {
            "seconds": round(time.perf_counter() - started, 2),
            "iterations_equal": sum(o.iterations == int(r["iterations"][0]) for o, r in zip(outcomes, solo)),
            "max_head_diff": max(float(np.abs(o.heads[k] - r[k]).max())
                                 for o, r in zip(outcomes, solo) for k in r.heads),
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
