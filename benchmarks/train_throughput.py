"""Training throughput of `crbp-deploy train`, before and after, measured in ONE run on one machine.

Why one run: this CPU is shared, and its load changes by several times within minutes, so two runs
at different times compare loads, not code. Each batch is timed on the wall clock and in process CPU
time: with one thread, CPU time is what a dedicated core would take, and other jobs hardly move it. Here every arm trains the same model (by default the bundled
crbp-pathfinder architecture and weights: hgru-pathfinder, 12 channels, 5x5; `--model` names another) on the same batches, and
the arms take turns batch by batch (the order rotating each round); each arm's figure is its median
batch, and the speed-up is the ratio of medians.

Arms (each one `trainer.train_step`, optimizer update included, exactly what the trainer runs; after each
batch the weights are set back to the checkpoint's, untimed, unless `--drift`):
- today: the trainer before this change: 30 plain steps (29 graph-free + 1 recorded), 15 Neumann
  terms, full LCP, channels-last;
- the rest: each adds one change to the arm before it, up to the trainer's current defaults;
- then those defaults with `--compile` (torch.compile of the forward's step; the compile happens in
  the warm-up batch, whose seconds are recorded as `warmup_s`), and in the other memory layout.

- with `--previous CKPT` (the checkpoint of the epoch before `--model`'s), `--warm-start`: each
  batch's forward starts from its fixed point under the previous epoch's weights, which is what the
  trainer's cache holds after a real epoch (the staleness is one epoch of updates, not a few batches).
  `--lengths` and `--steps` set the batches' contour lengths and the step cap (today's: 6,9,14 and 30).

It also profiles one step of `today` by part (forward steps without a graph, the recorded step, the
Neumann VJPs, the LCP, data) and checks what torch reports about bf16 on this CPU.

    OMP_NUM_THREADS=1 python benchmarks/train_throughput.py --threads 1 --rounds 8 --json docs/train_throughput.json
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from crbp_deploy.data.pathfinder import PathfinderConfig, PathfinderDataset
from crbp_deploy.flops import step_gflop
from crbp_deploy.models.solver import fixed_point
from crbp_deploy.sources import resolve_model
from crbp_deploy.tasks import TASKS
from crbp_deploy.training.compiled import compile_step
from crbp_deploy.training.lcp import lipschitz_penalty
from crbp_deploy.training.rbp import neumann_vjp
from crbp_deploy.training.solve import _run_steps as run_steps  # the trainer's graph-free forward
from crbp_deploy.training.trainer import LAYOUTS, TrainConfig, train_step
from crbp_deploy.training.warm_start import StateCache

TODAY = {"steps": 30, "neumann_steps": 15, "forward_solver": "picard", "forward_tol": 0.0, "backward_solver": "neumann",
         "backward_tol": 0.0, "lcp_every": 1, "layout": "channels_last", "compile": False, "warm_start": False}
WARM = "+ --warm-start (last epoch's fixed points)"


def arms() -> dict[str, dict]:
    """name -> TrainConfig overrides, each adding one change to the one before; the last is the
    trainer's defaults at today's steps and Neumann budget (--steps 30, --neumann-steps 15), then the
    defaults with `--compile`, with the other layout, and with `--warm-start` (run with --previous)."""
    d = TrainConfig()
    layout = {**TODAY, "layout": d.layout}
    forward = {**layout, "forward_solver": d.forward_solver, "forward_tol": d.forward_tol}
    backward = {**forward, "backward_solver": d.backward_solver, "backward_tol": d.backward_tol}
    return {
        "today": TODAY,
        "+ contiguous layout": layout,
        "+ anderson forward": forward,
        "+ anderson backward": backward,
        "+ lcp every 4th (trainer defaults)": {**backward, "lcp_every": d.lcp_every},
        "+ torch.compile forward (--compile)": {**backward, "lcp_every": d.lcp_every, "compile": True},
        # the default layout was chosen on one CPU; this arm checks it on the one the benchmark runs on
        "defaults, channels-last (--layout)": {**backward, "lcp_every": d.lcp_every, "layout": "channels_last"},
        WARM: {**backward, "lcp_every": d.lcp_every, "warm_start": True},
    }


def warm_cache(previous: str, data: list[dict], cfg: TrainConfig) -> StateCache:
    """The cache --warm-start holds after an epoch under the `previous` weights: each batch's fixed point,
    reached by the trainer's own graph-free forward (cfg's solver and tolerance, cfg.steps - 1 steps at most)."""
    model, _ = resolve_model(previous)
    model = model.eval()
    cache = StateCache(sum(len(b["images"]) for b in data))
    first = 0
    with torch.no_grad():
        for batch in data:
            ctx = model.encode(batch["images"])
            h, _ = run_steps(model.step, ctx, model.init_state(ctx), cfg.steps - 1, cfg.forward_tol, cfg.forward_solver)
            cache.store(torch.arange(first, first + len(h)), model.step(ctx, h))
            first += len(h)
    return cache


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def batches(count: int, batch: int, seed: int, lengths: tuple[int, ...] = (6, 9, 14)) -> list[dict]:
    data = PathfinderDataset(PathfinderConfig(length=max(lengths), size=64), count * batch, seed=seed, lengths=list(lengths))
    out = []
    for b in range(count):
        items = [data[i] for i in range(b * batch, (b + 1) * batch)]
        out.append({"images": torch.stack([x for x, _ in items]), "mask": torch.stack([y for _, y in items])})
    return out


def reset_weights(model, original) -> None:
    """Set `model`'s parameters back to `original`'s in place (a compiled step keeps seeing them)."""
    with torch.no_grad():
        for mine, theirs in zip(model.parameters(), original.parameters()):
            mine.copy_(theirs)


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def profile(model, batch: dict, repeats: int) -> dict[str, float]:
    """Seconds of each part of one `today` step (median of `repeats`), at the batch's fixed point."""
    model = copy.deepcopy(model).train().to(memory_format=torch.channels_last)
    x = batch["images"].contiguous(memory_format=torch.channels_last)
    parts: dict[str, list[float]] = {k: [] for k in ("forward_29_steps", "recorded_step", "neumann_15_vjps", "lcp")}
    data = PathfinderDataset(PathfinderConfig(length=14, size=64), len(x), seed=99, lengths=[6, 9, 14])
    parts["data_generate"] = []
    for _ in range(repeats):
        with torch.no_grad():
            ctx = model.encode(x)
            parts["forward_29_steps"].append(timed(lambda: fixed_point(model.step, ctx, model.init_state(ctx), iters=29)))
            h = fixed_point(model.step, ctx, model.init_state(ctx), iters=29)[0]
        prev = h.detach().requires_grad_()
        holder = {}
        parts["recorded_step"].append(timed(lambda: holder.update(last=model.step(ctx, prev))))
        last = holder["last"]
        v0 = torch.randn_like(last)
        parts["neumann_15_vjps"].append(timed(lambda: neumann_vjp(last, prev, v0, steps=15, floor=0.0, cap=float("inf"),
                                                                  growth_limit=float("inf"), patience=99)))
        parts["lcp"].append(timed(lambda: lipschitz_penalty(model.step(ctx, prev), prev).backward()))
        parts["data_generate"].append(timed(lambda: [data[i] for i in range(len(x))]))
    return {k: round(statistics.median(v), 4) for k, v in parts.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=8, help="Batches each arm trains (turns taken in rotation).")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--warmup", type=int, default=1, help="Untimed batches per arm first.")
    p.add_argument("--profile-repeats", type=int, default=3)
    p.add_argument("--model", default="crbp-pathfinder", help="Bundled name or checkpoint whose weights every arm trains.")
    p.add_argument("--init", action="store_true", help="Freshly initialised weights instead of the bundled ones.")
    p.add_argument("--previous", default=None, help="Checkpoint of the epoch before --model's: adds the --warm-start "
                   "arm, its cache filled with these weights' fixed points (as after a real epoch).")
    p.add_argument("--drift", action="store_true", help="Let each arm's weights move with its updates (lr 3e-3), as "
                   "before round 7; by default every batch trains the checkpoint's own weights, so the arms time one "
                   "model, and a model trained at a smaller rate is not shaken into another regime.")
    p.add_argument("--lengths", default="6,9,14", help="Contour lengths of the batches (today's run: 6,9,14).")
    p.add_argument("--steps", type=int, default=TODAY["steps"], help="Every arm's --steps (today's: 30).")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    lengths = tuple(int(x) for x in args.lengths.split(","))
    bundled, weights = resolve_model(args.model)
    if args.init:
        torch.manual_seed(0)
        bundled = type(bundled)(bundled.config)
    task = TASKS["pathfinder"]
    data = batches(args.rounds + args.warmup, args.batch_size, seed=7, lengths=lengths)
    runs = {}
    for name, overrides in arms().items():
        if name == WARM and not args.previous:
            continue
        cfg = TrainConfig.from_dict(task="pathfinder", loss="bce", lr=3e-3, batch_size=args.batch_size,
                                    **{**overrides, "steps": args.steps})
        model = copy.deepcopy(bundled).train().to(memory_format=LAYOUTS[cfg.layout])
        runs[name] = {"cfg": cfg, "model": model, "opt": torch.optim.Adam(model.parameters(), lr=cfg.lr),
                      "step": compile_step(model, torch.device("cpu")) if cfg.compile else None, "warmup_s": 0.0,
                      "cache": warm_cache(args.previous, data, cfg) if cfg.warm_start else None,
                      "seconds": [], "cpu_seconds": [], "work": [], "forward_steps": [], "vjps": []}
    names = list(runs)
    t_start = time.perf_counter()
    for r in range(args.warmup + args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            run = runs[name]
            t, c = time.perf_counter(), time.process_time()
            index = torch.arange(r * args.batch_size, (r + 1) * args.batch_size)
            start = (lambda cold, c=run["cache"], i=index: c.start(i, cold)) if run["cache"] else None
            _, sol, work = train_step(run["cfg"], task, run["model"], run["opt"], data[r], forward_step=run["step"],
                                      start_state=start)
            dt, dc = time.perf_counter() - t, time.process_time() - c
            if not args.drift:  # untimed: the next batch trains the checkpoint's weights again
                reset_weights(run["model"], bundled)
            if r < args.warmup:
                run["warmup_s"] += dt  # with --compile: the compile
            else:
                run["seconds"].append(dt)
                run["cpu_seconds"].append(dc)
                run["work"].append(work)
                run["forward_steps"].append(float(sol.forward_steps.float().mean()))
                run["vjps"].append(len(sol.neumann.v_norms) - 1)
        print(f"round {r + 1}/{args.warmup + args.rounds} done ({time.perf_counter() - t_start:.0f} s)", file=sys.stderr)
    gflop = step_gflop(bundled, 64, 64)
    base = statistics.median(runs["today"]["seconds"])
    base_cpu = statistics.median(runs["today"]["cpu_seconds"])
    results = {}
    for name, run in runs.items():
        sec, cpu = statistics.median(run["seconds"]), statistics.median(run["cpu_seconds"])
        work = statistics.mean(run["work"])
        results[name] = {
            "settings": {k: getattr(run["cfg"], k) for k in TODAY},
            "median_batch_s": round(sec, 4),
            "images_per_s": round(args.batch_size / sec, 2),
            "gflop_per_image": round(work * gflop, 4),
            "gflop_per_s": round(args.batch_size / sec * work * gflop, 2),
            "mean_forward_steps": round(statistics.mean(run["forward_steps"]), 2),
            "mean_vjps": round(statistics.mean(run["vjps"]), 2),
            "speedup_vs_today": round(base / sec, 2),
            # process CPU time: on one thread, what a dedicated core would take; other jobs' load hardly moves it
            "images_per_cpu_s": round(args.batch_size / cpu, 2),
            "speedup_vs_today_cpu": round(base_cpu / cpu, 2),
            "batch_seconds": [round(s, 4) for s in run["seconds"]],
            "warmup_s": round(run["warmup_s"], 1),
        }
        print(f"{name:>24}: {results[name]['images_per_s']:6.2f} images/s  {results[name]['gflop_per_s']:6.1f} GFLOP/s  "
              f"x{results[name]['speedup_vs_today']:.2f}  (CPU time: {results[name]['images_per_cpu_s']:6.2f} images/s "
              f"x{results[name]['speedup_vs_today_cpu']:.2f})  forward steps {results[name]['mean_forward_steps']}  "
              f"VJPs {results[name]['mean_vjps']}")
    parts = profile(bundled, data[0], args.profile_repeats)
    print("profile of one `today` step (s):", parts)
    report = {
        "command": "OMP_NUM_THREADS=1 python benchmarks/train_throughput.py " + " ".join(argv or sys.argv[1:]),
        "cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__, "batch_size": args.batch_size,
        "rounds": args.rounds, "weights": "init" if args.init else weights, "previous": args.previous,
        "lengths": list(lengths), "steps": args.steps, "drift": args.drift,
        "step_gflop": gflop, "bf16": {"mkldnn_bf16_supported": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
                                      "cpu_capability": torch.backends.cpu.get_cpu_capability()},
        "arms": results, "profile_today_s": parts,
    }
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
