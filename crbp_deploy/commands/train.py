"""`crbp-deploy train`: BPTT / C-BPTT / RBP / C-RBP training (single process or torchrun)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer

from .options import json_object



#: forward_at_cap above this share gets a note under the epoch line
CAPPED_HINT = 0.1


def _epoch_printer(out: Path, epochs: int):
    """The per-epoch line on stderr; the first one also appends the command to OUT/command.txt (after the
    first checkpoint, so a refused run writes nothing; a --resume adds its own line)."""
    import shlex
    import sys

    logged = []

    def show(record: dict) -> None:
        if not logged:
            with open(out / "command.txt", "a") as log:
                log.write(shlex.join(["crbp-deploy", *sys.argv[1:]]) + "\n")
            logged.append(True)
        keys = ("train_loss", "val_iou", "val_miou", "forward_steps", "forward_at_cap", "neumann_terms")
        shown = " ".join(f"{k}={record[k]:.4g}" for k in keys if isinstance(record.get(k), float))
        gflop = f"{record['gflop_per_s']:.1f}" if record.get("gflop_per_image") else "n/a (no recurrent step)"
        typer.echo(f"epoch {record['epoch']}/{epochs}: {shown} images/s={record['images_per_s']:.1f} "
                   f"GFLOP/s={gflop} ({record['seconds']:.0f} s)", err=True)
        if record.get("forward_at_cap", 0.0) > CAPPED_HINT:
            typer.echo(f"  note: {record['forward_at_cap']:.0%} of samples ran all --steps without reaching "
                       "--forward-tol; their implicit gradient is of a state short of the fixed point (raise --steps; "
                       "benchmarks/gradient_check.py --lengths measures the cost)", err=True)

    return show


def train(
    data: Path = typer.Option(..., "--data", help="Dataset folder written by `crbp-deploy data ...`."),
    out: Path = typer.Option(Path("runs/train"), "--out", help="Run folder: last.pt (checkpoint) + last.state.pt."),
    task: str = typer.Option("pathfinder", "--task", help="pathfinder | panoptic"),
    model: str = typer.Option("", "--model", help="Registered architecture (default: the task's)."),
    model_config: Optional[str] = typer.Option(None, "--model-config", help="JSON object of model config overrides."),
    grad: str = typer.Option("crbp", "--grad", help="bptt | cbptt | rbp | crbp"),
    steps: int = typer.Option(20, "--steps", help="Recurrent steps per training forward."),
    neumann_steps: int = typer.Option(15, "--neumann-steps", help="Neumann-series terms (rbp/crbp)."),
    neumann_rule: str = typer.Option(
        "patient", "--neumann-rule",
        help="Neumann stop on growth: patient (after --neumann-patience growing terms in a row) | public "
        "(the paper's code: at the first growing term).",
    ),
    neumann_patience: int = typer.Option(3, "--neumann-patience", help="Growing terms in a row that stop the series."),
    neumann_growth_limit: float = typer.Option(4.0, "--neumann-growth-limit",
                                               help="A term above this many times the first stops the series at once."),
    forward_tol: float = typer.Option(
        3e-3, "--forward-tol", help="rbp/crbp: run the forward per sample until its relative change <= this "
        "(--steps at most), so RBP differentiates a fixed point it has reached (0 = exactly --steps)."
    ),
    forward_solver: str = typer.Option(
        "anderson", "--forward-solver", help="rbp/crbp forward: anderson (accelerated, about 1/3 of the steps) | picard."
    ),
    backward_solver: str = typer.Option(
        "anderson", "--backward-solver", help="rbp/crbp implicit gradient: anderson (to --backward-tol, "
        "--neumann-steps VJPs at most) | neumann (the paper's series)."
    ),
    backward_tol: float = typer.Option(2e-2, "--backward-tol", help="Anderson backward: per-sample relative residual."),
    lcp_every: int = typer.Option(4, "--lcp-every", help="cbptt/crbp: the LCP on every k-th sample of a batch (1 = all)."),
    layout: str = typer.Option("contiguous", "--layout", help="Memory format: contiguous | channels_last."),
    curriculum: str = typer.Option(
        "", "--curriculum", help="Pathfinder contour lengths per epoch: auto (shortest first, one length added per "
        "stage) or stages EPOCH:LENGTHS such as '1:6,9;3:6,9,14' (default: every length every epoch)."
    ),
    lcp_lambda: float = typer.Option(0.9, "--lcp-lambda", help="LCP threshold lambda (cbptt/crbp)."),
    lcp_reduction: str = typer.Option("mean", "--lcp-reduction", help="LCP reduction: mean | batch | sum."),
    lcp_kind: str = typer.Option("columns", "--lcp-kind", help="LCP bounds by lambda: columns (the paper's 1ᵀJ) | spectral (ρ(J); weight ~10)."),
    penalty_weight: float = typer.Option(1000.0, "--penalty-weight", help="Weight of the LCP in the loss."),
    loss: str = typer.Option("focal", "--loss", help="Pathfinder loss: focal | bce | balanced (contour and background pixels weigh half each)."),
    lr: float = typer.Option(1e-3, "--lr", help="Adam learning rate."),
    batch_size: int = typer.Option(32, "--batch-size", help="Global batch size (split over torchrun processes)."),
    epochs: int = typer.Option(10, "--epochs"),
    clip_grad: float = typer.Option(0.0, "--clip-grad", help="Max gradient norm (0 = off)."),
    max_train: int = typer.Option(0, "--max-train", help="Use at most this many training samples (0 = all)."),
    seed: int = typer.Option(0, "--seed"),
    report_every: int = typer.Option(
        1, "--report-every", help="Measure the contraction report every N epochs (0: last epoch only; it costs hundreds of steps)."
    ),
    keep_epochs: bool = typer.Option(False, "--keep-epochs", help="Also keep OUT/epochN.pt after every epoch."),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda | cuda:N (the data stays on the host)."),
    compile: bool = typer.Option(False, "--compile", help="rbp/crbp: torch.compile the forward's step (seconds to compile; needs a C++ compiler on CPU)."),
    warm_start: bool = typer.Option(False, "--warm-start", help="rbp/crbp: each image's forward starts from its last fixed point (float16, on the host)."),
    resume: bool = typer.Option(
        False, "--resume", help="Continue from OUT/last.pt and OUT/last.state.pt (same --model and --model-config)."
    ),
    threads: int = typer.Option(0, "--threads", help="torch intra-op threads (0 = PyTorch default)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Train a recurrent segmenter; a checkpoint each epoch, readable by `crbp-deploy info`.

    Prints one line per epoch (loss, validation, images/s, GFLOP/s) on stderr; OUT/command.txt keeps
    the command. Distributed: `torchrun --nproc-per-node 2 -m crbp_deploy.cli train ...` (gloo on CPU).
    """
    import dataclasses

    import torch

    from ..training.trainer import TrainConfig, train as run_training

    options = dict(locals())  # every option above, by name
    if threads:
        torch.set_num_threads(threads)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig.from_dict({k: v for k, v in options.items() if k in names}, data=str(data),
                                model_config=json_object(model_config, "--model-config"))
    record = run_training(cfg, out, resume=resume, progress=not quiet, on_epoch=_epoch_printer(out, epochs))
    if os.environ.get("RANK", "0") == "0":
        typer.echo(json.dumps({"checkpoint": str(out / "last.pt"), **record}))
