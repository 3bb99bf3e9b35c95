"""Start a run folder for `crbp-deploy train --resume` from a checkpoint, with its hGRU kernels zero-padded.

Why: comparing kernel sizes from scratch costs hours per arm on a CPU. A k x k kernel zero-padded to
k' x k' computes the same function, so a k'-arm resumed from a trained k-model starts exactly where the
k-arm does and measures what the wider kernel adds from there. Both arms get a fresh Adam state.

    python benchmarks/widen_kernel.py runs/p23c/s9/epoch10.pt --kernel 7 --out runs/p23d/k7 --lr 1e-3
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from crbp_deploy import checkpoint
from crbp_deploy.models.registry import create_model


def widened(model, kernel: int):
    """A copy of `model` (hgru-pathfinder) with its cell's k x k kernels zero-padded to kernel x kernel."""
    old = model.config.kernel_size
    if kernel < old or (kernel - old) % 2:
        raise SystemExit(f"--kernel {kernel}: must be >= {old} and differ from it by an even number")
    config = {**model.config.to_dict(), "kernel_size": kernel}
    wide = create_model(model.arch, config)
    pad = (kernel - old) // 2
    keep = wide.state_dict().keys()  # a calibrated halting head is not part of training: it is dropped
    state = {k: (F.pad(v, (pad, pad, pad, pad)) if k.endswith(("w_inh", "w_exc")) else v)
             for k, v in model.state_dict().items() if k in keep}
    wide.load_state_dict(state)
    return wide


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--kernel", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--lr", type=float, required=True, help="Adam's learning rate, as the run's --lr.")
    args = p.parse_args(argv)
    model = checkpoint.load(args.checkpoint)
    wide = widened(model, args.kernel)
    epoch = int(model.meta["training"]["epochs_done"])
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {k: v for k, v in model.meta.items() if k in ("training", "data", "history", "metrics")}
    meta["widened_from"] = {"checkpoint": str(args.checkpoint), "kernel_size": model.config.kernel_size}
    checkpoint.save(wide, args.out / "last.pt", meta=meta)
    optimizer = torch.optim.Adam(wide.parameters(), lr=args.lr)
    torch.save({"optimizer": optimizer.state_dict(), "epoch": epoch}, args.out / "last.state.pt")
    print(f"{args.out}: {model.arch} kernel {model.config.kernel_size} -> {args.kernel}, epoch {epoch}, fresh Adam",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
