"""Train the issue-11 comparison on one CUDA GPU in a fixed wall-clock window: C-RBP, its feed-forward twin
of (near) equal parameters, and BPTT at the largest step count that fits C-RBP's training memory.

1. memory match: peak CUDA memory of one training step (solve + loss + backward) of C-RBP, and of BPTT
   at 1..--steps steps; BPTT gets the largest step count whose peak is <= C-RBP's;
2. the three `crbp-deploy train --device cuda --keep-epochs` runs side by side (same data, seed,
   optimiser, batch), stopped at the deadline;
3. every run is compared at the largest epoch all three reached (`epochN.pt`), so their epochs are equal.

Writes OUT/summary.json (memory table, commands, epochs reached, histories) and OUT/models.tar.gz
(each run's equal-epoch checkpoint and last.pt). The commands are recorded so they can be re-run or
resumed (`--resume`) anywhere.

    python benchmarks/panoptic_gpu_train.py --data data/pan128 --out $OUT --seconds 330
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from crbp_deploy.models import create_model  # noqa: E402
from crbp_deploy.training.solve import solve  # noqa: E402

CATEGORIES = {"num_classes": 4, "thing_classes": [0, 1]}  # the synthetic generator's classes
MODEL = {"grouping": "embedding", "channels": 32, "encoder_channels": 32, "head_channels": 32,
         "kernel_size": 5, "downsample": 1}
FF_MODEL = {**MODEL, "ff_depth": 2, "head_channels": 36}  # parameters within 0.2% of the hGRU's (printed)


def params(arch: str, config: dict) -> int:
    return sum(p.numel() for p in create_model(arch, {**CATEGORIES, **config}).parameters())


def peak_memory(grad: str, steps: int, batch: int, size: int, forward_tol: float) -> int:
    """Peak allocated CUDA bytes of one training step, above the model and batch already resident."""
    torch.manual_seed(0)
    model = create_model("hgru-panoptic", {**CATEGORIES, **MODEL}).cuda().train()
    images = torch.rand(batch, 3, size, size, device="cuda")
    for measure in (False, True):  # the first pass allocates parameter gradients and workspaces
        model.zero_grad(set_to_none=False)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        sol = solve(model, images, steps=steps, grad=grad, forward_tol=forward_tol if grad == "crbp" else 0.0)
        loss = sum(v.float().mean() for k, v in sol.outputs.items() if k in ("semantic", "embedding"))
        (loss + 1000.0 * sol.penalty).backward()
        torch.cuda.synchronize()
        if measure:
            return torch.cuda.max_memory_allocated() - base
    raise AssertionError("unreachable")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seconds", type=float, default=330.0, help="wall-clock training window")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--forward-tol", type=float, default=0.01)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    runs = args.out / "runs"
    summary: dict = {"params": {"crbp": params("hgru-panoptic", MODEL), "ff": params("ff-panoptic", FF_MODEL)}}
    print(json.dumps(summary), flush=True)

    if args.device == "cuda":
        crbp_peak = peak_memory("crbp", args.steps, args.batch_size, args.size, args.forward_tol)
        table = {"crbp": crbp_peak}
        bptt_steps = 1
        for n in range(1, args.steps + 1):
            table[f"bptt{n}"] = peak_memory("bptt", n, args.batch_size, args.size, 0.0)
            if table[f"bptt{n}"] <= crbp_peak:
                bptt_steps = n
            else:
                break
        summary["memory_bytes"] = table
        summary["bptt_steps"] = bptt_steps
        torch.cuda.empty_cache()
    else:  # a CPU dry run of the orchestration
        bptt_steps = 2
    print(json.dumps(summary), flush=True)

    common = ["--task", "panoptic", "--data", str(args.data), "--batch-size", str(args.batch_size), "--epochs", "400",
              "--lr", "1e-3", "--seed", "0", "--keep-epochs", "--quiet", "--device", args.device]
    jobs = {
        "crbp": ["--model", "hgru-panoptic", "--model-config", json.dumps(MODEL), "--grad", "crbp",
                 "--steps", str(args.steps), "--forward-tol", str(args.forward_tol)],
        "bptt": ["--model", "hgru-panoptic", "--model-config", json.dumps(MODEL), "--grad", "bptt",
                 "--steps", str(bptt_steps)],
        "ff": ["--model", "ff-panoptic", "--model-config", json.dumps(FF_MODEL), "--grad", "bptt", "--steps", "1"],
    }
    procs, commands = {}, {}
    deadline = time.monotonic() + args.seconds
    for name, extra in jobs.items():
        cmd = [sys.executable, "-m", "crbp_deploy.cli", "train", *common, "--out", str(runs / name), *extra]
        commands[name] = "crbp-deploy " + shlex.join(cmd[3:])
        log = open(args.out / f"{name}.log", "w")
        procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    summary["commands"] = commands
    while time.monotonic() < deadline and any(p.poll() is None for p in procs.values()):
        time.sleep(2)
    for p in procs.values():
        if p.poll() is None:
            p.terminate()
    for p in procs.values():
        p.wait(timeout=60)
    summary["returncodes"] = {n: p.returncode for n, p in procs.items()}

    reached = {}
    for name in jobs:
        epochs = [int(m.group(1)) for f in (runs / name).glob("epoch*.pt") if (m := re.fullmatch(r"epoch(\d+)\.pt", f.name))]
        reached[name] = max(epochs, default=0)
    equal = min(reached.values())
    summary["epochs_reached"], summary["equal_epoch"] = reached, equal
    with tarfile.open(args.out / "models.tar.gz", "w:gz") as tar:
        for name in jobs:
            for f in (runs / name / f"epoch{equal}.pt", runs / name / "last.pt"):
                if f.exists():
                    tar.add(f, arcname=f"{name}/{f.name}")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2), flush=True)
    return 0 if equal > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
