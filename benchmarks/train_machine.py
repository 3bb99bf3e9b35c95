"""Training throughput of the whole machine: every core, one process with threads or several (torchrun-style).

Why: the issue's baseline is `crbp-deploy train` with 2 threads on this 2-core machine, and
benchmarks/train_throughput.py compares arms on one thread, which says what a core does, not what
the machine does. A small recurrent step scales poorly over intra-op threads (each 12-channel
convolution is too small to split), while data parallelism (trainer.py via torch.distributed, gloo)
gives each core its own half of every batch. This benchmark runs both ways for today's path and the
trainer's defaults, on the same model and the same batches.

Each arm is a group of worker processes that join one gloo group (the trainer's `init_world`, from
the same environment torchrun sets) and run `trainer.train_step` on their share of each global
batch, exactly as the trainer does. Each batch is timed on rank 0's wall clock from a barrier to the
step's end (the gradient all-reduce included); then, untimed, the weights go back to the checkpoint's,
so every batch of every arm trains the same model. Arms take turns in rounds (the order rotating), each
round a fresh group: warm-up batches, then timed ones. An arm's figure is its median batch. Nothing
else should run on the machine: the load average is recorded before and after.

    python benchmarks/train_machine.py --model runs/p25/k5/epoch11.pt --rounds 4 --batches 4 --json docs/train_machine.json
"""
from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import os
import shlex
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # spawned workers import this file and its sibling by name
from train_throughput import arms, batches, cpu_name, reset_weights  # noqa: E402  (the per-core benchmark's arms and batches)

ARMS = {  # name -> (train_throughput arm, processes, threads per process)
    "today: 1 process x 2 threads": ("today", 1, 2),
    "today: 2 processes x 1 thread": ("today", 2, 1),
    "defaults: 1 process x 2 threads": ("+ lcp every 4th (trainer defaults)", 1, 2),
    "defaults: 2 processes x 1 thread": ("+ lcp every 4th (trainer defaults)", 2, 1),
    "defaults + --compile: 2 processes x 1 thread": ("+ torch.compile forward (--compile)", 2, 1),
}
BASELINE = "today: 1 process x 2 threads"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, size: int, threads: int, port: int, job: dict, out: str) -> None:
    """One rank of one arm: its slice of every batch through `train_step`, timed on rank 0."""
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(size), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": str(threads)})
    torch.set_num_threads(threads)
    from crbp_deploy.sources import resolve_model
    from crbp_deploy.tasks import TASKS
    from crbp_deploy.training.compiled import compile_step
    from crbp_deploy.training.distributed import barrier, init_world, shutdown
    from crbp_deploy.training.trainer import LAYOUTS, TrainConfig, train_step

    world = init_world()
    original, _ = resolve_model(job["model"])
    model = copy.deepcopy(original)
    cfg = TrainConfig.from_dict(task="pathfinder", loss="bce", lr=3e-3, batch_size=job["batch_size"],
                                **arms()[job["arm"]])
    model = model.train().to(memory_format=LAYOUTS[cfg.layout])
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    step = compile_step(model, torch.device("cpu")) if cfg.compile else None
    local = job["batch_size"] // size
    seconds = []
    for b, batch in enumerate(batches(job["warmup"] + job["batches"], job["batch_size"], seed=job["seed"])):
        mine = {k: v[rank * local:(rank + 1) * local] for k, v in batch.items()}
        barrier(world)
        t = time.perf_counter()
        train_step(cfg, TASKS["pathfinder"], model, optimizer, mine, world, forward_step=step)
        barrier(world)  # the batch is done when its slowest rank is
        if b >= job["warmup"]:
            seconds.append(time.perf_counter() - t)
        reset_weights(model, original)  # untimed: every batch trains the checkpoint's weights (as train_throughput)
    if rank == 0:
        Path(out).write_text(json.dumps(seconds))
    shutdown(world)


def run_arm(name: str, job: dict) -> list[float]:
    """The arm's timed batch seconds: one fresh process group for it."""
    arm, size, threads = ARMS[name]
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "times.json")
        port = free_port()
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=worker, args=(r, size, threads, port, {**job, "arm": arm}, out)) for r in range(size)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode for p in procs):
            raise RuntimeError(f"arm {name!r}: a worker exited with {[p.exitcode for p in procs]}")
        return json.loads(Path(out).read_text())


def summarise(seconds: dict[str, list[float]], batch_size: int) -> dict[str, dict]:
    base = statistics.median(seconds[BASELINE]) if BASELINE in seconds else None
    results = {}
    for name, t in seconds.items():
        sec = statistics.median(t)
        arm, size, threads = ARMS[name]
        results[name] = {"arm": arm, "processes": size, "threads_per_process": threads,
                         "median_batch_s": round(sec, 4), "images_per_s": round(batch_size / sec, 2),
                         "speedup_vs_baseline": round(base / sec, 2) if base else None,
                         "batch_seconds": [round(s, 4) for s in t]}
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="crbp-pathfinder", help="Bundled name or checkpoint whose weights every arm trains.")
    p.add_argument("--rounds", type=int, default=3, help="Turns each arm takes (a fresh process group each).")
    p.add_argument("--batches", type=int, default=4, help="Timed batches per arm per round.")
    p.add_argument("--warmup", type=int, default=1, help="Untimed batches per arm per round first.")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--arms", default=",".join(ARMS), help="Comma-separated arm names (default: all).")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    names = [n.strip() for n in args.arms.split(",") if n.strip()]
    unknown = [n for n in names if n not in ARMS]
    if unknown:
        p.error(f"unknown arm(s) {unknown}; known: {list(ARMS)}")
    if any(args.batch_size % ARMS[n][1] for n in names):
        p.error(f"--batch-size {args.batch_size} must divide over every arm's processes")
    job = {"model": args.model, "batch_size": args.batch_size, "warmup": args.warmup, "batches": args.batches, "seed": 7}
    load_before = os.getloadavg()
    seconds: dict[str, list[float]] = {n: [] for n in names}
    t0 = time.perf_counter()
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            seconds[name] += run_arm(name, job)
        print(f"round {r + 1}/{args.rounds} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    results = summarise(seconds, args.batch_size)
    for name, res in results.items():
        print(f"{name:>46}: {res['images_per_s']:6.2f} images/s  x{res['speedup_vs_baseline']}", file=sys.stderr)
    report = {"command": "python benchmarks/train_machine.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
              "cpu": cpu_name(), "cores": os.cpu_count(), "model": args.model, "batch_size": args.batch_size,
              "rounds": args.rounds, "batches_per_round": args.batches, "baseline": BASELINE,
              "load_average_before": [round(x, 2) for x in load_before],
              "load_average_after": [round(x, 2) for x in os.getloadavg()], "arms": results}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
