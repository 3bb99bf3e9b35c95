"""Does a Pathfinder model integrate contours, or group by proximity? What limits its PF25.

Issue 23 asks for IoU >= 85 on PF14 with PF25 at most 10 points lower. This compares a model, per held-out
image, with `proximity_fill` (pathfinder_claims.py): the drawn pixels reached from the marker discs by
flooding through drawn pixels and jumping gaps of up to 2 * `reach` pixels. That rule knows nothing of
orientation. Where a model scores at or under it, the model has not learned more than proximity; where
the rule fails (a contour gap wider than its distance to a distractor), only good continuation helps.

Per length it reports: the model's IoU at `--steps`, the proximity rule's at reach 1 and 2 (gaps of up to 2
and 4 pixels), how often the model beats the reach-1 rule, how close the model's answer is to that rule's
answer, the reach at which the target contour itself is one piece, and the share of target
pixels marked by their distance along the contour from the nearer marker. `--plot` draws the PF25 images
where the reach-1 rule and the model differ most; `--distance-plot` the recall by distance.

    OMP_NUM_THREADS=1 python benchmarks/proximity_probe.py crbp-pathfinder --data runs/p23/heldout \
      --json docs/proximity_crbp-pathfinder.json --plot docs/proximity_crbp-pathfinder.png \
      --distance-plot docs/proximity_distance_crbp-pathfinder.png
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from pathfinder_claims import disc_masks, flood_steps, proximity_fill  # noqa: E402

from crbp_deploy.sources import resolve_model  # noqa: E402
from crbp_deploy.tasks import PATHFINDER  # noqa: E402


def iou(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per image IoU of [N, H, W] bool masks."""
    inter, union = (pred & truth).sum((1, 2)), (pred | truth).sum((1, 2))
    return inter / np.maximum(union, 1)


def contour_reach(truth: np.ndarray, drawn: np.ndarray, discs: np.ndarray, widest: int = 4) -> np.ndarray:
    """Per image, the smallest reach at which proximity joins the whole drawn target from its discs (its
    widest gap is at most twice that)."""
    target = truth & drawn
    reach = np.full(len(truth), widest + 1)
    for r in range(widest, 0, -1):
        reached = proximity_fill(target, discs, r)
        reach[(reached.sum((1, 2)) >= 0.98 * target.sum((1, 2)))] = r
    return reach


def recall_by_distance(answer: np.ndarray, distance: np.ndarray, lengths: np.ndarray, bin_px: int) -> dict:
    """Per length, the share of target pixels the answer marks, by their distance (pixels along the contour)
    from the nearer marker: a fill that fades with distance has not propagated to the contour's middle."""
    out = {}
    for k in sorted(set(lengths.tolist())):
        d, a = distance[lengths == k], answer[lengths == k]
        bins = {}
        for lo in range(0, int(d.max()) + 1, bin_px):
            sel = (d >= lo) & (d < lo + bin_px)
            if sel.sum() >= 50:
                bins[str(lo)] = round(float(a[sel].mean()), 3)
        out[f"pf{k}"] = bins
    return out


def plot_distance(path: Path, curves: dict[str, dict], bin_px: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for (name, per), style in zip(curves.items(), ("-", "--")):
        for i, (length, bins) in enumerate(per.items()):
            ax.plot([int(b) + bin_px / 2 for b in bins], list(bins.values()), style, color=f"C{i}", marker="o", ms=3,
                    label=f"{name}, {length.upper()}")
    ax.set_xlabel("target pixel's distance from the nearer marker (pixels along the contour)")
    ax.set_ylabel("share of target pixels marked")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def answers(model, images: torch.Tensor, steps: int, batch: int = 50) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([model(images[i : i + batch], iters=steps)["logits"].argmax(1).numpy() == 1
                               for i in range(0, len(images), batch)])


def plot(path: Path, rows: dict[str, np.ndarray], pick: np.ndarray, titles: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), len(pick), figsize=(2.1 * len(pick), 2.2 * len(rows)), squeeze=False)
    for r, (name, stack) in enumerate(rows.items()):
        for c, i in enumerate(pick):
            ax = axes[r][c]
            ax.imshow(stack[i], cmap="gray", interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=9)
            if r == 0:
                ax.set_title(titles[c], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="Bundled name or checkpoint.")
    p.add_argument("--data", type=Path, required=True, help="A mixed-length Pathfinder folder (held out).")
    p.add_argument("--limit", type=int, default=150)
    p.add_argument("--steps", type=int, default=40, help="Plain steps the model runs (its training steps).")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path)
    p.add_argument("--plot", type=Path, help="Longest-contour images where the model and the reach-1 rule differ most.")
    p.add_argument("--distance-plot", type=Path, help="Recall by distance from the nearer marker, per length.")
    p.add_argument("--bin", type=int, default=6, help="Distance bin in pixels.")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, label = resolve_model(args.model)
    data = PATHFINDER.open(args.data)
    n = min(args.limit, len(data.lengths))
    pairs = [data.load(i) for i in range(n)]
    images = np.stack([im for im, _ in pairs])
    truth = np.stack([m for _, m in pairs]).astype(bool)
    lengths = np.asarray(data.lengths[:n])
    drawn, discs = images > 0.5, disc_masks(data, n)
    model_answer = answers(model.eval(), torch.from_numpy(images)[:, None], args.steps)
    fill = {r: proximity_fill(drawn, discs, r) for r in (1, 2)}
    scores = {"model": iou(model_answer, truth), "proximity reach 1": iou(fill[1], truth),
              "proximity reach 2": iou(fill[2], truth)}
    agreement, reach = iou(model_answer, fill[1]), contour_reach(truth, drawn, discs)
    per = {}
    for k in sorted(set(lengths.tolist())):
        s = lengths == k
        per[f"pf{k}"] = {
            **{f"iou_{name.replace(' ', '_')}": round(float(v[s].mean()), 3) for name, v in scores.items()},
            "model_beats_reach1_by_0.05": round(float((scores["model"][s] > scores["proximity reach 1"][s] + 0.05).mean()), 3),
            "reach1_beats_model_by_0.05": round(float((scores["proximity reach 1"][s] > scores["model"][s] + 0.05).mean()), 3),
            "iou_model_vs_reach1_answer": round(float(agreement[s].mean()), 3),
            "target_reach_mean": round(float(reach[s].mean()), 2),
            "target_needs_reach_over_1": round(float((reach[s] > 1).mean()), 3),
        }
    distance = flood_steps(truth, discs, reach=2)
    by_distance = {label: recall_by_distance(model_answer, distance, lengths, args.bin),
                   "proximity reach 1": recall_by_distance(fill[1], distance, lengths, args.bin)}
    report = {"model": label, "data": str(args.data), "images": n, "steps": args.steps, "per_length": per,
              "recall_by_distance_px": by_distance,
              "note": "IoU is the mean over images here (pathfinder_claims pools pixels over a length)",
              "command": "OMP_NUM_THREADS=1 python benchmarks/proximity_probe.py " + " ".join(argv or sys.argv[1:])}
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    if args.distance_plot:
        plot_distance(args.distance_plot, by_distance, args.bin)
    if args.plot:
        longest = np.flatnonzero(lengths == lengths.max())
        differ = longest[np.argsort(-np.abs(scores["model"] - scores["proximity reach 1"])[longest])][:6]
        titles = [f"IoU model {scores['model'][i]:.2f}, proximity {scores['proximity reach 1'][i]:.2f}" for i in differ]
        plot(args.plot, {"image": images, "truth": truth, "proximity, reach 1": fill[1], label: model_answer}, differ, titles)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
