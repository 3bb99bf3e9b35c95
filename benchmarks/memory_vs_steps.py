"""Peak memory of ONE training step (forward + backward) vs the number of steps T: BPTT vs C-RBP.

The paper's claim: BPTT memory grows linearly with T, C-RBP's does not. CPU PyTorch has no
max_memory_allocated, so each (mode, T) runs in a fresh subprocess that measures the process's
resident memory (Linux: /proc/self/status and clear_refs):

1. build hgru-pathfinder and a batch, run one warm-up training step with T = 1 in the same mode
   (loads kernels, allocates parameter gradients), then gc + malloc_trim;
2. baseline = VmRSS; write "5" to /proc/self/clear_refs, which resets the peak (VmHWM);
3. one training step (solve + cross-entropy + 10·LCP + backward); peak = VmHWM.

Reported: peak − baseline. MALLOC_MMAP_THRESHOLD_ is fixed at 64 KiB so glibc serves every
tensor of note with mmap and returns it to the OS when freed: RSS then follows live memory
instead of a malloc arena's high-water mark. A second, deterministic column counts the distinct
storages autograd saves for backward (saved_tensors_hooks) in a separate forward.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/memory_vs_steps.py
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = {"bptt": "BPTT", "crbp": "C-RBP"}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(mode: str, steps: int, size: int, batch: int, channels: int) -> dict:
    """One measurement; runs inside a fresh interpreter."""
    import torch
    import torch.nn.functional as F

    from crbp_deploy.models import create_model
    from crbp_deploy.training import solve
    from crbp_deploy.training.memory import saved_for_backward_bytes

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = create_model("hgru-pathfinder", channels=channels)
    images = torch.rand(batch, 1, size, size)
    target = (torch.rand(batch, size, size) > 0.9).long()

    def train_step(t: int):
        sol = solve(model, images, steps=t, grad=mode, lcp_lambda=0.9)
        loss = F.cross_entropy(sol.outputs["logits"], target) + 10.0 * sol.penalty
        loss.backward()
        return sol

    train_step(1)  # warm-up
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    baseline = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    assert _status_kib("VmHWM") <= baseline + 1024, "peak RSS did not reset"

    start = time.perf_counter()
    sol = train_step(steps)
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    info = sol.neumann
    del sol
    model.zero_grad()

    # deterministic cross-check, a separate forward: distinct storages autograd saves for
    # backward, without the parameters and the input batch (they are in the baseline)
    saved_bytes = saved_for_backward_bytes(model, images, steps=steps, grad=mode, lcp_lambda=0.9)
    return {
        "mode": mode,
        "steps": steps,
        "peak_delta_mib": (peak - baseline) / 1024,
        "baseline_mib": baseline / 1024,
        "saved_mib": saved_bytes / 2**20,
        "seconds": seconds,
        "neumann_terms": None if info is None else info.terms,
        "neumann_stop": None if info is None else info.stop,
    }


def run_all(args) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(ROOT)}
    rows = []
    for mode in args.modes:
        for steps in args.steps:
            cmd = [sys.executable, __file__, "--worker", mode, str(steps),
                   "--size", str(args.size), "--batch", str(args.batch), "--channels", str(args.channels)]
            out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            print(f"{mode:5s} T={steps:3d}  peak +{row['peak_delta_mib']:8.1f} MiB  saved {row['saved_mib']:8.1f} MiB"
                  f"  {row['seconds']:6.1f} s", flush=True)
            rows.append(row)
    return rows


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, label in MODES.items():
        pts = [r for r in rows if r["mode"] == mode]
        if pts:
            ax.plot([r["steps"] for r in pts], [r["peak_delta_mib"] for r in pts], "o-", label=f"{label}: peak RSS")
            ax.plot([r["steps"] for r in pts], [r["saved_mib"] for r in pts], "x--", alpha=0.6,
                    label=f"{label}: saved for backward")
    ax.set_xlabel("recurrent steps T")
    ax.set_ylabel("memory of one training step (MiB)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", nargs=2, metavar=("MODE", "T"), help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20, 40, 80])
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--channels", type=int, default=25)
    parser.add_argument("--json", type=Path, default=ROOT / "docs" / "memory.json")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "memory.png")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.size, args.batch, args.channels)))
        return
    rows = run_all(args)
    setup = {"model": "hgru-pathfinder", "size": args.size, "batch": args.batch, "channels": args.channels,
             "kernel_size": 15, "dtype": "float32", "threads": 1, "neumann_steps": 15, "lcp_weight": 10.0,
             "torch": __import__("torch").__version__}
    args.json.write_text(json.dumps({"setup": setup, "results": rows}, indent=2) + "\n")
    title = f"hgru-pathfinder {args.channels} ch, {args.size}x{args.size}, batch {args.batch}, fp32, CPU"
    plot(rows, args.plot, title)
    print(f"wrote {args.json} and {args.plot}")


if __name__ == "__main__":
    main()
