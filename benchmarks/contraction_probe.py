"""Is a Pathfinder checkpoint's map contractive where it runs? docs/contraction.md (issue 23 table).

    OMP_NUM_THREADS=1 python benchmarks/contraction_probe.py runs/p23b/k5bce/epoch5.pt runs/p23c/s9/epoch10.pt \
        --data runs/p23/data/val --json docs/contraction_probe.json

For each checkpoint, on the first `--per-length` val images of each of `--lengths`: `contraction_report`
(max 1ᵀJ, ‖J‖₂, ρ(J) and the plain steps to a relative change of 1e-4, at most 300) and the relative
change per image after `--steps` plain steps and after as many damped steps h <- (1-a) h + a F(h).
Why: the paper's LCP bounds the column sums; this shows whether that bounds convergence.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def last_change(model, ctx, steps: int, damping: float) -> list[float]:
    """Per-image relative change of the last of `steps` damped steps (damping 1: plain steps)."""
    from crbp_deploy.models.solver import relative_change

    h = model.init_state(ctx)
    for _ in range(steps):
        new = (1 - damping) * h + damping * model.step(ctx, h)
        change, h = relative_change(new, h), new
    return [round(float(c), 4) for c in change.flatten()]


def probe(path: str, data: str, lengths: list[int], per_length: int, steps: int, damping: float) -> dict:
    from crbp_deploy.contraction import contraction_report
    from crbp_deploy.data.pathfinder import PathfinderFolder
    from crbp_deploy.sources import resolve_model

    model, label = resolve_model(path)
    model.eval()
    folder = PathfinderFolder(data)
    picked = {n: [] for n in lengths}
    for i in range(len(folder)):
        n = folder.config_of(i).length
        if n in picked and len(picked[n]) < per_length:
            picked[n].append(folder[i][0])
    images = torch.stack([x for n in lengths for x in picked[n]])
    report = contraction_report(model, images, tol=1e-4, max_iters=300)
    with torch.no_grad():
        ctx = model.encode(images)
        plain, damped = last_change(model, ctx, steps, 1.0), last_change(model, ctx, steps, damping)
    keys = ("fixed_point", "spectral_radius", "jacobian_norm", "max_column_sum")
    return {"model": label, "lengths": [n for n in lengths for _ in picked[n]], **{k: report[k] for k in keys},
            f"change_after_{steps}_plain": plain, f"change_after_{steps}_damped_{damping:g}": damped}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="checkpoints or bundled names")
    ap.add_argument("--data", required=True, help="a Pathfinder split with mixed lengths")
    ap.add_argument("--lengths", type=int, nargs="+", default=[14, 25])
    ap.add_argument("--per-length", type=int, default=2)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--damping", type=float, default=0.5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    records = [probe(m, args.data, args.lengths, args.per_length, args.steps, args.damping) for m in args.models]
    for r in records:
        print(json.dumps(r))
    if args.json:
        args.json.write_text(json.dumps(records, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
