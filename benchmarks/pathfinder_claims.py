"""The C-RBP paper's Pathfinder claims, small: BPTT-6 vs C-RBP-20 on PF14 and a longer contour.

Claims (Linsley et al., NeurIPS 2020): (b) run past their training horizon, BPTT models collapse
while C-RBP models stay stable; (c) C-RBP beats BPTT on longer contours at lower memory.

One command does everything, through the project's own CLI and library:

1. data:  `crbp-deploy data pathfinder` writes DATA/pf{L}/train and DATA/pf{L}/val per length
          (reused when a folder with the same config, count and seed is already there);
2. train: `crbp-deploy train --task pathfinder` once per (length, method, seed), with the same
          budget (images, epochs, batch size, lr) for every method; `--jobs` runs at once;
3. eval:  on each length's val split, IoU after every test-time step count in `--eval-steps`
          (one trajectory per batch, read out at each listed step; cross-checked against
          `PATHFINDER.train_eval(model, val, T)` and the trainer's last val IoU), precision, recall split into
          marker discs (found locally) and contour paddles (need grouping), the mean relative state
          change per step, early exit (`model(max_iters=M, tol=eps)`): iterations and IoU, and
          1ᵀJ / Neumann behaviour at the training horizon and the last step; also the tensors
          autograd saves for one training step of each method (memory) and the IoU of predicting
          every drawn pixel (the no-grouping baseline);
4. write: JSON with every number and the setup, docs/stability.png, docs/accuracy.png.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/pathfinder_claims.py

Nothing here picks a model by its validation score: every run trains for the full budget and
its last checkpoint is evaluated. Runs (and data) that already exist with the same settings are
not redone; `--skip-train` evaluates whatever checkpoints exist.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "crbp_deploy.cli"]
LABELS = {"bptt": "BPTT", "cbptt": "C-BPTT", "rbp": "RBP", "crbp": "C-RBP"}
COLORS = {"bptt": "tab:red", "cbptt": "tab:orange", "rbp": "tab:green", "crbp": "tab:blue"}


def train_steps(args, method: str) -> int:
    """BPTT-style methods train with --bptt-steps, fixed-point methods with --crbp-steps."""
    return args.bptt_steps if method in ("bptt", "cbptt") else args.crbp_steps


# ---------------------------------------------------------------- commands


def data_command(args, length: int, split: str) -> list[str]:
    count = args.train_count if split == "train" else args.val_count
    seed = args.seed_data + (0 if split == "train" else 1)
    return [*CLI, "data", "pathfinder", "--length", str(length), "--size", str(args.size),
            "--distractors", str(args.distractors), "--count", str(count), "--seed", str(seed),
            "--out", str(args.work / "data" / f"pf{length}" / split), "--no-progress", "--overwrite"]


def shown(cmd: list[str]) -> str:
    """A command as a user would type it (relative paths, the `crbp-deploy` entry point)."""
    return "crbp-deploy " + " ".join(shlex.quote(c.replace(str(ROOT) + "/", "")) for c in cmd[len(CLI) :])


def data_is_current(cmd: list[str]) -> bool:
    """Is the folder this command writes already there, with the same config, count and seed?"""
    opts = dict(zip(cmd[len(CLI) + 2 :: 2], cmd[len(CLI) + 3 :: 2]))
    index = Path(opts["--out"]) / "index.json"
    if not index.is_file():
        return False
    meta = json.loads(index.read_text())
    cfg = meta["config"]
    return (meta["count"] == int(opts["--count"]) and meta["seed"] == int(opts["--seed"])
            and cfg["length"] == int(opts["--length"]) and cfg["size"] == int(opts["--size"])
            and cfg["distractors"] == int(opts["--distractors"]))


def run_name(length: int, method: str, steps: int, seed: int) -> str:
    return f"pf{length}-{method}{steps}-s{seed}"


def train_command(args, length: int, method: str, seed: int) -> list[str]:
    steps = train_steps(args, method)
    return [*CLI, "train", "--task", "pathfinder", "--data", str(args.work / "data" / f"pf{length}"),
            "--out", str(args.work / "runs" / run_name(length, method, steps, seed)),
            "--model-config", json.dumps(args.model_config, separators=(",", ":")),
            "--grad", method, "--steps", str(steps), "--neumann-steps", str(args.neumann_steps),
            "--lcp-lambda", str(args.lcp_lambda), "--lcp-reduction", args.lcp_reduction,
            "--penalty-weight", str(args.penalty_weight), "--loss", args.loss, "--lr", str(args.lr),
            "--batch-size", str(args.batch_size), "--epochs", str(args.epochs), "--seed", str(seed),
            "--threads", str(args.threads), "--quiet"]


def run_is_current(args, length: int, method: str, seed: int) -> bool:
    """Has this run already finished with exactly these training settings (so re-runs skip it)?"""
    from crbp_deploy import checkpoint

    path = args.work / "runs" / run_name(length, method, train_steps(args, method), seed) / "last.pt"
    if not path.is_file():
        return False
    done = checkpoint.read(path)["meta"].get("training", {})
    want = {"data": str(args.work / "data" / f"pf{length}"), "model_config": args.model_config, "grad": method,
            "steps": train_steps(args, method), "neumann_steps": args.neumann_steps, "lcp_lambda": args.lcp_lambda,
            "lcp_reduction": args.lcp_reduction, "penalty_weight": args.penalty_weight, "loss": args.loss,
            "lr": args.lr, "batch_size": args.batch_size, "epochs": args.epochs, "seed": seed,
            "epochs_done": args.epochs}
    return all(done.get(k) == v for k, v in want.items())


def run_queue(jobs: list[tuple[str, list[str]]], parallel: int, logs: Path) -> dict[str, float]:
    """Run commands, `parallel` at a time, in the given order; wall seconds per job. Fails loudly."""
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    pending, running, seconds = list(jobs), {}, {}
    while pending or running:
        while pending and len(running) < parallel:
            name, cmd = pending.pop(0)
            print(f"[{time.strftime('%H:%M:%S')}] start {name}: {' '.join(cmd[1:])}", flush=True)
            log = open(logs / f"{name}.log", "w")
            running[name] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT),
                             log, time.perf_counter())
        time.sleep(1.0)
        for name, (proc, log, t0) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[name]
            seconds[name] = round(time.perf_counter() - t0, 1)
            if proc.returncode:
                tail = (logs / f"{name}.log").read_text()[-2000:]
                for other, (p, _, _) in running.items():
                    p.terminate()
                raise SystemExit(f"{name} failed (exit {proc.returncode}):\n{tail}")
            print(f"[{time.strftime('%H:%M:%S')}] done  {name} in {seconds[name]:.0f} s", flush=True)
    return seconds


# ---------------------------------------------------------------- evaluation


def contraction_stats(model, images, mask, steps: int, lam: float, neumann_steps: int) -> dict:
    """At step `steps`: u = 1ᵀJ (what the LCP penalises) and how the Neumann series behaves on the
    task gradient there (does RBP's gradient exist for this model at this state?)."""
    import torch
    import torch.nn.functional as F

    from crbp_deploy.training.lcp import column_sums
    from crbp_deploy.training.rbp import neumann_vjp

    with torch.no_grad():
        ctx = model.encode(images)
        h = model.init_state(ctx)
        for _ in range(steps - 1):
            h = model.step(ctx, h)
    with torch.enable_grad():
        prev = h.detach().requires_grad_()
        last = model.step(ctx, prev)
        u = column_sums(last, prev, create_graph=False)
        loss = F.cross_entropy(model.readout(ctx, last)["logits"], mask)
        (v0,) = torch.autograd.grad(loss, last, retain_graph=True)
        _, info = neumann_vjp(last, prev, v0, steps=neumann_steps)
    return {
        "steps": steps, "u_mean": float(u.mean()), "u_max": float(u.max()),
        "u_above_lambda": float((u > lam).float().mean()), "penalty_mean": float((torch.relu(u - lam) ** 2).mean()),
        "neumann_terms": info.terms, "neumann_stop": info.stop,
        "neumann_v_ratio": info.v_norms[-1] / info.v_norms[0],  # ‖v_last‖ / ‖v_0‖ (< 1: contracting)
    }


def disc_masks(folder, count: int):
    """Per image of a PathfinderFolder, the pixels whose centre lies inside one of its marker discs. The
    generator is deterministic, so the scenes are re-sampled from each image's config and the folder's seed."""
    import numpy as np

    from crbp_deploy.data.pathfinder import sample_scene

    cfg, radius = folder.config, folder.config.geometry()["marker_radius"]
    yy, xx = np.mgrid[0 : cfg.size, 0 : cfg.size] + 0.5
    masks = []
    for i in range(count):
        disc = np.zeros((cfg.size, cfg.size), bool)
        for x, y in sample_scene(folder.config_of(i), i, folder.seed).markers:
            disc |= (xx - x) ** 2 + (yy - y) ** 2 <= radius**2
        masks.append(disc)
    return np.stack(masks)


def marker_masks(val_folder: Path):
    """Per image, the target pixels inside its marker discs (the rest of the target is the contour's
    paddles). Finding the discs is local; following the contour is the task."""
    import torch

    from crbp_deploy.data.pathfinder import PathfinderFolder

    folder = PathfinderFolder(val_folder)
    discs = disc_masks(folder, len(folder))
    return torch.stack([torch.from_numpy(d & folder.load(i)[1]) for i, d in enumerate(discs)])


def evaluate_run(job: dict) -> dict:
    """All test-time numbers of one checkpoint on its length's val split (runs in a worker)."""
    import torch

    from crbp_deploy import checkpoint
    from crbp_deploy.models.solver import relative_change
    from crbp_deploy.tasks import EVAL_BATCH, PATHFINDER
    from crbp_deploy.tasks.pathfinder import as_tensors, pixel_counts

    def iou_counts(logits, mask):  # intersection and union of the contour pixels, summed over the batch
        tp, fp, fn = pixel_counts(logits.argmax(1) == 1, mask).sum(0).tolist()
        return tp, tp + fp + fn

    torch.set_num_threads(job["threads"])
    t0 = time.perf_counter()
    model = checkpoint.load(Path(job["checkpoint"]))
    model = model.to(memory_format=torch.channels_last)
    val = as_tensors(PATHFINDER.open(Path(job["val"])))
    val["images"] = val["images"].contiguous(memory_format=torch.channels_last)
    discs = marker_masks(Path(job["val"]))
    grid, last = sorted(set(job["eval_steps"])), max(job["eval_steps"])
    # per listed step: intersection, union, predicted, true, found disc px, disc px, found contour px, contour px
    counts = {t: [0] * 8 for t in grid}
    change = torch.zeros(last)  # summed per-sample relative state change after each step
    ee_counts, iterations, residuals = [0, 0], [], []
    n = len(val["images"])
    with torch.no_grad():
        for i in range(0, n, EVAL_BATCH):
            images, mask = val["images"][i : i + EVAL_BATCH], val["mask"][i : i + EVAL_BATCH]
            disc = discs[i : i + EVAL_BATCH]
            contour = mask.bool() & ~disc
            # fixed steps: one trajectory, read out at every listed step (= model(images, iters=t))
            ctx = model.encode(images)
            h = model.init_state(ctx)
            for t in range(1, last + 1):
                new = model.step(ctx, h)
                change[t - 1] += relative_change(new, h).sum()
                h = new
                if t in counts:
                    logits = model.readout(ctx, h)["logits"]
                    a, b = iou_counts(logits, mask)
                    pred = logits.argmax(1).bool()
                    for k, v in enumerate((a, b, pred.sum(), mask.sum(), (pred & disc).sum(), disc.sum(),
                                           (pred & contour).sum(), contour.sum())):
                        counts[t][k] += int(v)
            # early exit
            out = model(images, max_iters=job["max_iters"], tol=job["tol"])
            a, b = iou_counts(out["logits"], mask)
            ee_counts[0] += a
            ee_counts[1] += b
            iterations.append(out["iterations"])
            residuals.append(out["residual"])
        # cross-check the trajectory against the library's own evaluation at the training horizon
        library = PATHFINDER.train_eval(model, val, job["train_steps"])["iou"]
    first = slice(0, EVAL_BATCH)
    contraction = [contraction_stats(model, val["images"][first], val["mask"][first], t, job["lcp_lambda"],
                                     job["neumann_steps"]) for t in (job["train_steps"], last)]
    iters = torch.cat(iterations).float()
    res = torch.cat(residuals)
    history = model.meta.get("history", [])
    fixed = {t: c[0] / max(c[1], 1) for t, c in counts.items()}
    return {
        "name": job["name"], "length": job["length"], "method": job["method"], "seed": job["seed"],
        "train_steps": job["train_steps"],
        "iou_vs_steps": {str(t): v for t, v in fixed.items()},
        "precision_vs_steps": {str(t): c[0] / max(c[2], 1) for t, c in counts.items()},
        "recall_vs_steps": {str(t): c[0] / max(c[3], 1) for t, c in counts.items()},
        "recall_marker_discs_vs_steps": {str(t): c[4] / max(c[5], 1) for t, c in counts.items()},
        "recall_contour_vs_steps": {str(t): c[6] / max(c[7], 1) for t, c in counts.items()},
        "marker_disc_share_of_target": counts[grid[0]][5] / max(counts[grid[0]][3], 1),
        "contraction_first_val_batch": contraction,
        "mean_relative_change": change.div(n).tolist(),
        "iou_at_train_steps": fixed.get(job["train_steps"], library),
        "iou_library_check": library,
        "iou_trainer_last_val": history[-1]["val_iou"] if history else None,
        "early_exit": {
            "max_iters": job["max_iters"], "tol": job["tol"], "iou": ee_counts[0] / max(ee_counts[1], 1),
            "mean_iterations": float(iters.mean()), "median_iterations": float(iters.median()),
            "p90_iterations": float(iters.quantile(0.9)), "max_iterations": int(iters.max()),
            "converged_fraction": float((res <= job["tol"]).float().mean()),
        },
        "history": history,
        "train_seconds": sum(r.get("seconds", 0.0) for r in history),
        "eval_seconds": round(time.perf_counter() - t0, 1),
    }


def drawn_pixel_baseline(val_folder: Path) -> float:
    """IoU of predicting every drawn pixel (image > 0.5): what needs no grouping at all."""
    from crbp_deploy.tasks import PATHFINDER
    from crbp_deploy.tasks.pathfinder import as_tensors

    val = as_tensors(PATHFINDER.open(val_folder))
    pred, true = val["images"][:, 0] > 0.5, val["mask"].bool()
    return float((pred & true).sum() / (pred | true).sum())


def saved_for_backward_mib(args, method: str, steps: int) -> float:
    """Distinct storages autograd saves in one training forward (batch of `--batch-size`), without
    parameters and inputs: the memory that grows with steps under BPTT (see docs/memory.md)."""
    import torch

    from crbp_deploy.models import create_model
    from crbp_deploy.training.memory import saved_for_backward_bytes

    torch.manual_seed(0)
    model = create_model("hgru-pathfinder", args.model_config)
    images = torch.rand(args.batch_size, 1, args.size, args.size)
    saved = saved_for_backward_bytes(model, images, steps=steps, grad=method, lcp_lambda=args.lcp_lambda,
                                     lcp_reduction=args.lcp_reduction)
    return saved / 2**20


def init_contraction_stats(args, length: int) -> dict:
    """contraction_stats of the untrained model (training seed 0's init): where training starts."""
    import torch

    from crbp_deploy.models import create_model
    from crbp_deploy.tasks import EVAL_BATCH, PATHFINDER
    from crbp_deploy.tasks.pathfinder import as_tensors

    torch.manual_seed(args.seeds[0])
    model = create_model("hgru-pathfinder", args.model_config).eval()
    val = as_tensors(PATHFINDER.open(args.work / "data" / f"pf{length}" / "val"))
    first = slice(0, EVAL_BATCH)
    return contraction_stats(model, val["images"][first], val["mask"][first], args.crbp_steps, args.lcp_lambda,
                             args.neumann_steps)


# ---------------------------------------------------------------- plots


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def plot_stability(results: list[dict], baselines: dict, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["length"] for r in results})
    fig, axes = plt.subplots(2, len(lengths), figsize=(5.2 * len(lengths), 7), sharex=True, squeeze=False)
    for col, length in enumerate(lengths):
        top, bottom = axes[0, col], axes[1, col]
        for method in LABELS:
            runs = [r for r in results if r["length"] == length and r["method"] == method]
            if not runs:
                continue
            steps = sorted(int(t) for t in runs[0]["iou_vs_steps"])
            for r in runs:
                alpha = 1.0 if len(runs) == 1 else 0.35
                top.plot(steps, [r["iou_vs_steps"][str(t)] for t in steps], "o-", ms=3, color=COLORS[method],
                         alpha=alpha, label=f"{LABELS[method]}-{r['train_steps']}" if r is runs[0] else None)
                change = r["mean_relative_change"]
                bottom.semilogy(range(2, len(change) + 1), change[1:], color=COLORS[method], alpha=alpha,
                                label=f"{LABELS[method]}-{r['train_steps']}" if r is runs[0] else None)
                ee = r["early_exit"]
                top.plot([ee["mean_iterations"]], [ee["iou"]], "*", ms=12, color=COLORS[method], mec="k",
                         label=f"{LABELS[method]} early exit (tol {ee['tol']:g})" if r is runs[0] else None)
            if len(runs) > 1:
                top.plot(steps, [_mean([r["iou_vs_steps"][str(t)] for r in runs]) for t in steps], "-",
                         lw=2.5, color=COLORS[method])
            for ax in (top, bottom):
                ax.axvline(runs[0]["train_steps"], color=COLORS[method], ls="--", lw=1)
        top.axhline(baselines[length], color="gray", ls=":", lw=1, label="all drawn pixels")
        top.set_title(f"PF{length}, {args.size}x{args.size}: val IoU vs test-time steps\n"
                      "(stars: early exit, at its mean iterations)", fontsize=10)
        top.set_ylabel("IoU")
        top.set_ylim(0, 1)
        bottom.axhline(args.tol, color="gray", ls=":", lw=1, label=f"tol {args.tol:g}")
        bottom.set_ylabel("mean relative state change per step")
        bottom.set_xlabel("test-time steps (dashed: training T)")
        for ax in (top, bottom):
            ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_accuracy(results: list[dict], baselines: dict, memory: dict, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["length"] for r in results})
    bars = [(m, "iou_at_train_steps", "") for m in args.methods]
    if "crbp" in args.methods:
        bars.append(("crbp", "early_exit", "//"))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    width = 0.8 / len(bars)
    for j, (method, key, hatch) in enumerate(bars):
        for i, length in enumerate(lengths):
            runs = [r for r in results if r["length"] == length and r["method"] == method]
            if not runs:
                continue
            vals = [r["early_exit"]["iou"] if key == "early_exit" else r[key] for r in runs]
            x = i + (j - (len(bars) - 1) / 2) * width
            steps = runs[0]["train_steps"]
            label = f"{LABELS[method]}-{steps}" + (" (early exit)" if key == "early_exit" else "")
            ax.bar(x, _mean(vals), width, color=COLORS[method], hatch=hatch, alpha=0.85 if hatch else 1.0,
                   edgecolor="k", label=label if i == 0 else None)
            if len(vals) > 1:
                ax.plot([x] * len(vals), vals, "k.", ms=4)
            ax.text(x, _mean(vals) + 0.01, f"{_mean(vals):.3f}", ha="center", fontsize=8)
    for i, length in enumerate(lengths):
        ax.hlines(baselines[length], i - 0.45, i + 0.45, colors="gray", linestyles=":",
                  label="all drawn pixels" if i == 0 else None)
    ax.set_xticks(range(len(lengths)), [f"PF{n} ({args.size}px)" for n in lengths])
    ax.set_ylabel("val IoU (at the training steps)")
    ax.set_ylim(0, 1.05)
    mem = ", ".join(f"{LABELS[m]} {v:.0f} MiB" for m, v in memory.items())
    ax.set_title(f"Same budget per model; saved for backward per training step (batch {args.batch_size}):\n{mem}",
                 fontsize=9)
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- main


def tables(results: list[dict], baselines: dict) -> str:
    """Markdown tables of the headline numbers (printed; the doc quotes them)."""
    lines = ["| run | IoU @ train T | trainer val IoU | early exit IoU | mean / p90 / max iters | converged |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        ee = r["early_exit"]
        lines.append(f"| {r['name']} | {r['iou_at_train_steps']:.3f} | {r['iou_trainer_last_val']:.3f} | "
                     f"{ee['iou']:.3f} | {ee['mean_iterations']:.1f} / {ee['p90_iterations']:.0f} / "
                     f"{ee['max_iterations']} | {ee['converged_fraction']:.0%} |")
    steps = sorted(int(t) for t in results[0]["iou_vs_steps"])
    lines += ["", "| run | " + " | ".join(str(t) for t in steps) + " |", "|---|" + "---:|" * len(steps)]
    for r in results:
        lines.append(f"| {r['name']} | " + " | ".join(f"{r['iou_vs_steps'][str(t)]:.3f}" for t in steps) + " |")
    lines += ["", "| run | recall: marker discs / contour @ train T | @ last step |", "|---|---:|---:|"]
    for r in results:
        t, end = str(r["train_steps"]), str(max(int(k) for k in r["iou_vs_steps"]))
        lines.append(f"| {r['name']} | {r['recall_marker_discs_vs_steps'][t]:.3f} / {r['recall_contour_vs_steps'][t]:.3f}"
                     f" | {r['recall_marker_discs_vs_steps'][end]:.3f} / {r['recall_contour_vs_steps'][end]:.3f} |")
    lines += ["", "| run | precision / recall @ train T | @ last step | u mean / max / >λ @ T | Neumann @ T | @ last step |",
              "|---|---:|---:|---:|---|---|"]
    for r in results:
        t, end = str(r["train_steps"]), str(max(int(k) for k in r["iou_vs_steps"]))
        c0, c1 = r["contraction_first_val_batch"]
        lines.append(f"| {r['name']} | {r['precision_vs_steps'][t]:.3f} / {r['recall_vs_steps'][t]:.3f} | "
                     f"{r['precision_vs_steps'][end]:.3f} / {r['recall_vs_steps'][end]:.3f} | "
                     f"{c0['u_mean']:.3f} / {c0['u_max']:.3f} / {c0['u_above_lambda']:.2%} | "
                     f"{c0['neumann_terms']} ({c0['neumann_stop']}, ratio {c0['neumann_v_ratio']:.2g}) | "
                     f"{c1['neumann_terms']} ({c1['neumann_stop']}, ratio {c1['neumann_v_ratio']:.2g}) |")
    lines += ["", "drawn-pixel baseline IoU: " + ", ".join(f"PF{k} {v:.3f}" for k, v in baselines.items())]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "pathfinder_claims", help="data, runs, logs")
    p.add_argument("--docs", type=Path, default=ROOT / "docs", help="where JSON and plots go")
    p.add_argument("--lengths", type=int, nargs="+", default=[14, 20], help="PF lengths (first: stability)")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--distractors", type=int, default=-1, help="-1: the generator's auto count")
    p.add_argument("--train-count", type=int, default=1800)
    p.add_argument("--val-count", type=int, default=160)
    p.add_argument("--seed-data", type=int, default=0, help="train seed; val uses seed + 1")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds per model")
    p.add_argument("--model-config", type=json.loads, default={"channels": 8, "kernel_size": 9})
    p.add_argument("--methods", nargs="+", choices=list(LABELS), default=["bptt", "crbp"],
                   help="gradient methods to compare (rbp: the no-LCP control; cbptt: BPTT + LCP)")
    p.add_argument("--bptt-steps", type=int, default=6)
    p.add_argument("--crbp-steps", type=int, default=20)
    p.add_argument("--neumann-steps", type=int, default=15)
    p.add_argument("--lcp-lambda", type=float, default=0.9)
    p.add_argument("--lcp-reduction", default="mean")
    p.add_argument("--penalty-weight", type=float, default=10.0)
    p.add_argument("--loss", default="bce", help="bce: focal stayed all-background in the pilot")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--jobs", type=int, default=2, help="processes at once (data, training, evaluation)")
    p.add_argument("--eval-steps", type=int, nargs="+", default=[1, 2, 4, 6, 8, 12, 16, 20, 24, 30, 40, 60, 80])
    p.add_argument("--max-iters", type=int, default=200)
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument("--skip-train", action="store_true", help="evaluate existing checkpoints only")
    p.add_argument("--tag", default="", help="suffix of the output files (e.g. for a bigger run)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    args.work = args.work.resolve()
    t_start = time.perf_counter()
    sys.path.insert(0, str(ROOT))
    logs = args.work / "logs"
    commands: list[str] = []

    # 1. data
    data_jobs = []
    for length in args.lengths:
        for split in ("train", "val"):
            cmd = data_command(args, length, split)
            commands.append(shown(cmd))
            if not data_is_current(cmd):
                data_jobs.append((f"data-pf{length}-{split}", cmd))
    # longest first: more images and longer contours take longer
    data_jobs.sort(key=lambda j: ("train" not in j[0], -int(j[0].split("pf")[1].split("-")[0])))
    data_seconds = run_queue(data_jobs, args.jobs, logs)
    t_data = time.perf_counter() - t_start

    # 2. training: C-RBP runs (slower per batch) first so that the queue balances
    slow_first = sorted(args.methods, key=lambda m: train_steps(args, m), reverse=True)
    runs = [(length, method, seed) for method in slow_first for length in args.lengths for seed in args.seeds]
    train_jobs = []
    for length, method, seed in runs:
        cmd = train_command(args, length, method, seed)
        commands.append(shown(cmd))
        steps = train_steps(args, method)
        train_jobs.append((run_name(length, method, steps, seed), cmd))
    todo = [job for job, (length, method, seed) in zip(train_jobs, runs) if not run_is_current(args, length, method, seed)]
    train_seconds = {} if args.skip_train else run_queue(todo, args.jobs, logs)
    t_train = time.perf_counter() - t_start - t_data

    # 3. evaluation, one worker per checkpoint
    eval_jobs = []
    for (length, method, seed), (name, _) in zip(runs, train_jobs):
        eval_jobs.append({
            "name": name, "length": length, "method": method, "seed": seed,
            "train_steps": train_steps(args, method),
            "checkpoint": str(args.work / "runs" / name / "last.pt"),
            "val": str(args.work / "data" / f"pf{length}" / "val"),
            "eval_steps": args.eval_steps, "max_iters": args.max_iters, "tol": args.tol, "threads": args.threads,
            "lcp_lambda": args.lcp_lambda, "neumann_steps": args.neumann_steps,
        })
    print(f"[{time.strftime('%H:%M:%S')}] evaluating {len(eval_jobs)} checkpoints", flush=True)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        results = list(pool.map(evaluate_run, eval_jobs))
    import torch

    torch.set_num_threads(args.threads)
    baselines = {length: drawn_pixel_baseline(args.work / "data" / f"pf{length}" / "val") for length in args.lengths}
    memory = {m: saved_for_backward_mib(args, m, train_steps(args, m)) for m in args.methods}
    init_contraction = {length: init_contraction_stats(args, length) for length in args.lengths}
    t_eval = time.perf_counter() - t_start - t_data - t_train

    for r in results:  # the trajectory must agree with the library's evaluation
        if abs(r["iou_at_train_steps"] - r["iou_library_check"]) > 1e-3:
            print(f"WARNING {r['name']}: trajectory IoU {r['iou_at_train_steps']:.4f} != "
                  f"PATHFINDER.train_eval {r['iou_library_check']:.4f}", flush=True)

    # 4. write
    from crbp_deploy.data.pathfinder import PathfinderConfig

    geometry = {length: PathfinderConfig(length=length, size=args.size, distractors=args.distractors).geometry()
                for length in args.lengths}
    setup = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    report = {
        "setup": setup, "geometry_px": geometry, "torch": torch.__version__,
        "commands": commands,
        "drawn_pixel_baseline_iou": baselines,
        "saved_for_backward_mib": memory,
        "init_contraction_first_val_batch": init_contraction,
        "results": results,
        "wall_seconds": {"data": round(t_data, 1), "train": round(t_train, 1), "eval": round(t_eval, 1),
                         "total": round(time.perf_counter() - t_start, 1),
                         "per_data_job": data_seconds, "per_train_job": train_seconds},
    }
    args.docs.mkdir(parents=True, exist_ok=True)
    tag = f"_{args.tag}" if args.tag else ""
    out_json = args.docs / f"pathfinder_claims{tag}.json"
    out_json.write_text(json.dumps(report, indent=1) + "\n")
    plot_stability([r for r in results if r["length"] in args.lengths], baselines, args,
                   args.docs / f"stability{tag}.png")
    plot_accuracy(results, baselines, memory, args, args.docs / f"accuracy{tag}.png")
    print(tables(results, baselines))
    print(f"wrote {out_json}, stability{tag}.png, accuracy{tag}.png; total {report['wall_seconds']['total']:.0f} s")


# ---------------------------------------------------------------- compare (issue 23)


def compare_run(job: dict) -> dict:
    """One checkpoint on a held-out mixed-length folder: IoU per length at 1x/2x/4x its training steps
    (plain steps, as `model(iters=t)` runs them) and early exit: iterations per length, Spearman."""
    import torch

    from crbp_deploy import checkpoint
    from crbp_deploy.tasks import PATHFINDER

    torch.set_num_threads(job["threads"])
    model = checkpoint.load(Path(job["checkpoint"])).eval()
    data = PATHFINDER.open(Path(job["heldout"]))
    run = PATHFINDER.runner(model)
    limit = job["limit"]
    out = {"label": job["label"], "checkpoint": job["checkpoint"], "train_steps": job["steps"], "fixed": {}}
    for factor in (1, 2, 4):
        r = PATHFINDER.evaluate(run, data, limit=limit, iters=job["steps"] * factor)
        out["fixed"][f"{factor}x"] = {"steps": job["steps"] * factor, "iou": r["iou"],
                                      "per_length": {n: v["iou"] for n, v in r["per_length"].items()}}
    if getattr(model, "recurrent", True):
        r = PATHFINDER.evaluate(run, data, limit=limit, max_iters=job["max_iters"], tol=job["tol"])
        out["early_exit"] = {"max_iters": job["max_iters"], "tol": job["tol"], "iou": r["iou"],
                             "iterations": r["iterations"], "spearman_length_iterations": r["spearman_length_iterations"],
                             "per_length": {n: {"iou": v["iou"], "mean_iterations": v["mean_iterations"]}
                                            for n, v in r["per_length"].items()}}
    history = model.meta.get("history", [])
    out["history"] = [{k: v for k, v in h.items() if k != "neumann"} for h in history]
    out["parameters"] = sum(p.numel() for p in model.parameters())
    out["training"] = model.meta.get("training", {})
    return out


def compare_plot(results: list[dict], baselines: dict[str, dict[str, float]], path: Path) -> None:
    """Colour is the run (one legend under the figure), shade the horizon, line style the length: legends inside
    the axes covered the bars once three runs were shown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6 + 0.25 * len(results)))
    lengths = sorted({int(n) for r in results for n in r["fixed"]["1x"]["per_length"]})
    width = 0.8 / max(1, 3 * len(results))
    shades = dict(zip(("1x", "2x", "4x"), (1.0, 0.65, 0.35)))
    for i, r in enumerate(results):
        for j, (factor, alpha) in enumerate(shades.items()):
            values = [r["fixed"][factor]["per_length"].get(str(n), float("nan")) for n in lengths]
            pos = [k + (3 * i + j) * width for k in range(len(lengths))]
            axes[0].bar(pos, values, width, color=f"C{i}", alpha=alpha)
    keys = [Patch(color="gray", alpha=a, label=f"{f} the training steps") for f, a in shades.items()]
    for (name, per), style in zip(baselines.items(), (":", "--", "-.")):
        for k, n in enumerate(lengths):
            axes[0].hlines(per.get(str(n), float("nan")), k - width, k + 0.8, colors="gray", linestyles=style)
        keys.append(Line2D([], [], color="gray", linestyle=style, label=f"baseline: {name.replace('_', ' ')}"))
    axes[0].set_xticks([k + 0.4 - width / 2 for k in range(len(lengths))], [f"PF{n}" for n in lengths])
    axes[0].set_ylabel("IoU (held out)")
    axes[0].set_title("IoU per length at 1x / 2x / 4x the training steps")
    axes[0].legend(handles=keys, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.07), ncol=3)
    styles = {"val_iou_pf6": ":", "val_iou_pf14": "-", "val_iou_pf25": "--"}
    for i, r in enumerate(results):
        color, hist = f"C{i}", r["history"]
        epochs = [h["epoch"] for h in hist]
        for key, style in styles.items():
            if any(key in h for h in hist):
                axes[1].plot(epochs, [h.get(key) for h in hist], style, color=color, marker="o", ms=3)
        if "early_exit" in r:
            ee = r["early_exit"]["per_length"]
            axes[2].plot([int(n) for n in ee], [v["mean_iterations"] for v in ee.values()], color=color, marker="o")
    axes[1].set_xlabel("epoch")
    axes[1].set_ylabel("val IoU")
    axes[1].set_title("learning curves (val PF6 dotted, PF14 solid, PF25 dashed)")
    axes[2].set_xlabel("contour length (paddles)")
    axes[2].set_ylabel("mean iterations to converge")
    axes[2].set_title("iterations per length (early exit)")
    runs = [Patch(color=f"C{i}", label=r["label"]) for i, r in enumerate(results)]
    fig.legend(handles=runs, loc="lower center", ncol=min(3, len(runs)), fontsize=8)
    fig.tight_layout(rect=(0, 0.05 + 0.04 * ((len(runs) + 2) // 3), 1, 1))
    fig.savefig(path, dpi=110)


def flood_steps(drawn, seeds, reach: int = 1):
    """Per drawn pixel, the flood step at which it is reached from `seeds`, flooding through drawn pixels and
    jumping gaps of up to 2 * `reach` pixels (the drawn mask grown by a cross of radius `reach`, flooded
    8-connected, one pixel per step); -1 where never reached. drawn, seeds: [N, H, W] bool."""
    import numpy as np

    def grow(m, offsets):
        out, (h, w), r = m.copy(), m.shape[-2:], reach + 1
        padded = np.pad(m, ((0, 0), (r, r), (r, r)))
        for dy, dx in offsets:
            out |= padded[:, r + dy : r + dy + h, r + dx : r + dx + w]
        return out

    cross = [(dy, dx) for dy in range(-reach, reach + 1) for dx in range(-reach, reach + 1) if abs(dy) + abs(dx) <= reach]
    square = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    mask = grow(drawn, cross)
    reached = seeds & mask
    steps = np.where(reached, 0, -1)
    for step in range(1, mask[0].size + 1):
        more = grow(reached, square) & mask
        if (more == reached).all():
            break
        steps[more & ~reached] = step
        reached = more
    return np.where(drawn, steps, -1)


def proximity_fill(drawn, seeds, reach: int = 1):
    """Grouping by proximity alone: the drawn pixels `flood_steps` reaches from `seeds`. A contour integrator
    must beat it where a contour's gaps are wider than its distance to a distractor."""
    return flood_steps(drawn, seeds, reach) >= 0


def baselines_per_length(folder: Path, limit: int) -> dict[str, dict[str, float]]:
    """IoU per contour length of three answers that need no contour integration: every drawn pixel (image >
    0.5), the two marker discs alone (found locally; a model above both has followed some of the contour), and
    the drawn pixels reached from the discs by proximity, jumping gaps of up to 2 pixels (`proximity_fill`)."""
    import numpy as np

    from crbp_deploy.tasks import PATHFINDER
    from crbp_deploy.tasks.pathfinder import pixel_counts, scores

    data = PATHFINDER.open(folder)
    n = min(limit or len(data), len(data))
    pairs = [data.load(i) for i in range(n)]
    truth = np.stack([m for _, m in pairs])
    lengths = np.asarray(data.lengths[:n])
    drawn, discs = np.stack([im > 0.5 for im, _ in pairs]), disc_masks(data, n)
    out = {}
    for name, pred in (("drawn_pixels", drawn), ("marker_discs", discs), ("proximity_fill", proximity_fill(drawn, discs))):
        counts = pixel_counts(pred, truth)
        out[name] = {str(k): scores(counts[lengths == k])["iou"] for k in sorted(set(lengths.tolist()))}
    return out


def compare(argv: list[str]) -> None:
    """`compare --run LABEL=CHECKPOINT:STEPS ... --heldout DIR`: the issue-23 comparison of trained runs."""
    p = argparse.ArgumentParser(prog="pathfinder_claims.py compare")
    p.add_argument("--run", action="append", required=True, help="LABEL=CHECKPOINT:TRAINING_STEPS")
    p.add_argument("--heldout", type=Path, required=True, help="a mixed-length Pathfinder folder (held out)")
    p.add_argument("--limit", type=int, default=0)
    p.add_argument("--max-iters", type=int, default=200)
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--json", type=Path, help="write the report here (default: none; docs/ files only when named)")
    p.add_argument("--plot", type=Path, help="write the plot here (default: none)")
    args = p.parse_args(argv)
    jobs = []
    for item in args.run:
        label, rest = item.split("=", 1)
        ckpt, steps = rest.rsplit(":", 1)
        jobs.append({"label": label, "checkpoint": ckpt, "steps": int(steps), "heldout": str(args.heldout),
                     "limit": args.limit, "max_iters": args.max_iters, "tol": args.tol, "threads": args.threads})
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        results = list(pool.map(compare_run, jobs))
    report = {"command": "python benchmarks/pathfinder_claims.py compare " + " ".join(shlex.quote(a) for a in argv),
              "heldout": str(args.heldout), "seconds": round(time.perf_counter() - t0, 1),
              "baselines": baselines_per_length(args.heldout, args.limit), "runs": results}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    if args.plot:
        compare_plot(results, report["baselines"], args.plot)
    for name, per in report["baselines"].items():
        print(f"baseline {name}: " + "/".join(f"{v:.3f}" for v in per.values()))
    for r in results:
        line = "  ".join(f"{f} {r['fixed'][f]['iou']:.3f} " + "/".join(f"{v:.3f}" for v in r["fixed"][f]["per_length"].values())
                         for f in ("1x", "2x", "4x"))
        ee = r.get("early_exit")
        extra = f"  early exit it/len {[round(v['mean_iterations'], 1) for v in ee['per_length'].values()]} rho {ee['spearman_length_iterations']}" if ee else ""
        print(f"{r['label']}: {line}{extra}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["compare"]:
        compare(sys.argv[2:])
    else:
        main()
