"""Does a Pathfinder model's answer take longer to settle on longer contours? The ceiling of any halting policy.

Issue 23 asks that iterations rise with contour length (Spearman >= 0.5 per image at the card's
policy). A policy can only stop after the answer is done, so this runs the model `--steps` plain
steps on held-out images and records, per image:

- settle: the first step from which the answer (argmax of the logits) stays within `--pixels` pixels
  of its final answer for every later step: what a perfect answer-watching policy would spend;
- best: the step with the highest IoU against the truth (the per-image oracle's stop).

If neither rises with length, no halting rule can make the iterations follow length on this model.

    OMP_NUM_THREADS=1 python benchmarks/settle_by_length.py crbp-pathfinder --data runs/p23/heldout --json docs/settle_crbp-pathfinder.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from crbp_deploy.sources import resolve_model
from crbp_deploy.tasks import PATHFINDER
from crbp_deploy.tasks.pathfinder import spearman


def answers_over_steps(model, images: torch.Tensor, masks: torch.Tensor, steps: int) -> tuple[torch.Tensor, np.ndarray]:
    """[steps, N] how many pixels differ from the final answer, and [steps, N] IoU with the truth."""
    answers, ious = [], []
    with torch.no_grad():
        ctx = model.encode(images)
        h = model.init_state(ctx)
        for _ in range(steps):
            h = model.step(ctx, h)
            a = model.readout(ctx, h)["logits"].argmax(1) == 1
            answers.append(a)
            union = (a | masks).sum((1, 2)).float().clamp_min(1)
            ious.append(((a & masks).sum((1, 2)).float() / union).numpy())
    stacked = torch.stack(answers)
    return (stacked != stacked[-1]).flatten(2).sum(-1), np.stack(ious)


def per_length(values: np.ndarray, lengths: np.ndarray) -> dict[str, float]:
    return {f"pf{n}": round(float(values[lengths == n].mean()), 2) for n in sorted(set(lengths.tolist()))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="Bundled name or checkpoint.")
    p.add_argument("--data", type=Path, required=True, help="A mixed-length Pathfinder folder (held out).")
    p.add_argument("--limit", type=int, default=150)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--pixels", type=int, default=2, help="Pixels from the final answer that count as settled.")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, label = resolve_model(args.model)
    model.eval()
    data = PATHFINDER.open(args.data)
    n = min(args.limit, len(data.lengths))
    pairs = [data.load(i) for i in range(n)]
    images = torch.from_numpy(np.stack([im for im, _ in pairs]))[:, None]
    masks = torch.from_numpy(np.stack([m for _, m in pairs])).bool()
    lengths = np.asarray(data.lengths[:n])
    differ, ious = answers_over_steps(model, images, masks, args.steps)
    settled = (differ <= args.pixels).flip(0).cumprod(0).flip(0)  # [steps, N]: settled from this step on
    settle = (args.steps - settled.sum(0) + 1).clamp_max(args.steps).numpy()
    best = ious.argmax(0) + 1
    report = {
        "model": label, "data": str(args.data), "images": n, "steps": args.steps, "pixels": args.pixels,
        "settle_step": {"per_length": per_length(settle, lengths), "spearman_length": round(spearman(lengths, settle), 3)},
        "best_iou_step": {"per_length": per_length(best, lengths), "spearman_length": round(spearman(lengths, best), 3)},
        "iou_at_last_step": per_length(ious[-1], lengths), "iou_oracle": per_length(ious.max(0), lengths),
        "command": "OMP_NUM_THREADS=1 python benchmarks/settle_by_length.py " + " ".join(argv or sys.argv[1:]),
    }
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
