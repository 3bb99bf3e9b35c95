"""The training loop: any task, any grad mode, one process or many (torchrun), resumable.

Each epoch ends with a validation pass and an atomic checkpoint (`last.pt`, which `crbp-deploy
info` reads) plus the optimizer state (`last.state.pt`) for `--resume`. The checkpoint's card
holds the measured contraction report (contraction.py) at the fixed points of 4 training images.

rbp/crbp: every batch's Neumann solve (terms, stop reason, ‖v_K‖/‖v₀‖) goes to the progress bar
and the history; each epoch is summarised, and a NeumannWarning is raised (and kept in the
record) when the series stops on growth within 3 terms in more than 10% of the batches — then
the gradient is close to one-step back-propagation, not RBP.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .. import checkpoint
from ..contraction import contraction_report
from ..config import StrictConfig
from ..errors import ConfigError, CrbpError
from ..flops import step_gflop
from ..models import create_model
from ..tasks import TASKS
from .compiled import compile_step
from .distributed import World, all_sum, average_gradients, barrier, init_world, shutdown
from .lcp import DEFAULT_KIND, DEFAULT_LAMBDA, DEFAULT_REDUCTION, DEFAULT_WEIGHT, LCP_KINDS, LCP_REDUCTIONS
from .rbp import BACKWARD_SOLVERS, DEFAULT_GROWTH_LIMIT, DEFAULT_PATIENCE, DEFAULT_RULE, NEUMANN_RULES, STOP_REASONS, NeumannInfo
from .solve import FORWARD_SOLVERS, GRAD_MODES, solve
from .throughput import Meter, step_equivalents
from .warm_start import StateCache
from . import curriculum as schedule

#: An epoch warns when more than this share of its batches stop on growth within EARLY_TERMS terms.
EARLY_GROWTH_SHARE = 0.1
EARLY_TERMS = 3
#: The share of batches with at least this many terms is reported (the target of the LCP defaults).
GOOD_TERMS = 10
REPORT_IMAGES = 4  # training images the checkpoint's contraction report is measured on
#: The training forward's defaults (benchmarks/train_throughput.py measured them against plain
#: fixed-count steps): Anderson to a relative change of 3e-3, --steps at most.
DEFAULT_FORWARD_SOLVER = "anderson"
DEFAULT_FORWARD_TOL = 3e-3
# On the bundled model the Anderson backward at 2e-2 took ~5 VJPs and came closer to the exact implicit
# gradient (relative error 0.19) than 15 Neumann terms (0.29); at 1e-2, 7 VJPs and 0.10.
DEFAULT_BACKWARD_SOLVER = "anderson"
DEFAULT_BACKWARD_TOL = 2e-2
DEFAULT_LCP_EVERY = 4
DEFAULT_LAYOUT = "contiguous"  # GroupNorm runs ~4x slower on channels-last tensors here
LAYOUTS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


class NeumannWarning(UserWarning):
    """The Neumann series of RBP/C-RBP stops too early: the gradient is near one-step backprop."""


@dataclass(frozen=True)
class TrainConfig(StrictConfig):
    task: str = "pathfinder"
    data: str = ""  # dataset folder written by `crbp-deploy data ...`
    model: str = ""  # registered architecture; default: the task's
    model_config: dict = field(default_factory=dict)
    grad: str = "crbp"
    steps: int = 20
    neumann_steps: int = 15
    neumann_rule: str = DEFAULT_RULE  # "patient" | "public" (the paper's code: stop at the first growing term)
    neumann_patience: int = DEFAULT_PATIENCE
    neumann_growth_limit: float = DEFAULT_GROWTH_LIMIT
    forward_tol: float = DEFAULT_FORWARD_TOL  # rbp/crbp: > 0 runs the forward per sample to this relative change (steps at most)
    forward_solver: str = DEFAULT_FORWARD_SOLVER  # rbp/crbp: picard | anderson (anderson.py)
    backward_solver: str = DEFAULT_BACKWARD_SOLVER  # rbp/crbp: neumann | anderson (rbp.anderson_vjp)
    backward_tol: float = DEFAULT_BACKWARD_TOL  # anderson backward: per-sample relative residual (neumann_steps VJPs at most)
    # cbptt/crbp: the LCP on every k-th sample of each process's batch (solve()); N processes take the
    # steps of one when k divides the per-process batch
    lcp_every: int = DEFAULT_LCP_EVERY
    layout: str = DEFAULT_LAYOUT  # memory format of images and weights: channels_last | contiguous
    curriculum: str = ""  # pathfinder: contour lengths per epoch ("auto" or "E:L,L;E:L", curriculum.py); "" = all
    lcp_lambda: float = DEFAULT_LAMBDA
    lcp_reduction: str = DEFAULT_REDUCTION  # per element: one weight fits every model and image size (lcp.py)
    lcp_kind: str = DEFAULT_KIND  # columns (the paper's 1ᵀJ) | spectral (an estimate of ρ(J); lcp.py)
    penalty_weight: float = DEFAULT_WEIGHT  # measured so the series runs >= 10 terms (docs/contraction.md)
    loss: str = "focal"  # pathfinder: focal | bce | balanced (losses.balanced_loss)
    lr: float = 1e-3
    batch_size: int = 32  # global, split evenly over processes
    epochs: int = 10
    clip_grad: float = 0.0  # max gradient norm; 0 = off
    seed: int = 0
    max_train: int = 0  # use at most this many training samples (0 = all)
    report_every: int = 1  # contraction report in the checkpoint every N epochs (0: last epoch only)
    keep_epochs: bool = False  # also keep OUT/epoch{N}.pt, so runs can be compared at an equal epoch
    device: str = "cpu"  # "cpu" | "cuda" | "cuda:N"; the data stays on the host, one batch at a time moves
    compile: bool = False  # rbp/crbp: torch.compile the graph-free forward's step (compiled.py)
    warm_start: bool = False  # rbp/crbp: each image's forward starts from its last fixed point (warm_start.py)

    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    def validate(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.grad not in GRAD_MODES:
            raise ConfigError(f"grad must be one of {', '.join(GRAD_MODES)}, got {self.grad!r}")
        for name in ("steps", "batch_size", "epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.report_every < 0:
            raise ConfigError(f"report_every must be >= 0, got {self.report_every}")
        if self.neumann_steps < 0 or self.penalty_weight < 0 or self.clip_grad < 0 or self.max_train < 0:
            raise ConfigError("neumann_steps, penalty_weight, clip_grad and max_train must be >= 0")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive number, got {self.lr}")
        if self.neumann_rule not in NEUMANN_RULES:
            raise ConfigError(f"neumann_rule must be one of {', '.join(NEUMANN_RULES)}, got {self.neumann_rule!r}")
        if not self.forward_tol >= 0:
            raise ConfigError(f"forward_tol must be >= 0, got {self.forward_tol}")
        if self.forward_solver not in FORWARD_SOLVERS:
            raise ConfigError(f"forward_solver must be one of {', '.join(FORWARD_SOLVERS)}, got {self.forward_solver!r}")
        if self.backward_solver not in BACKWARD_SOLVERS:
            raise ConfigError(f"backward_solver must be one of {', '.join(BACKWARD_SOLVERS)}, got {self.backward_solver!r}")
        if not self.backward_tol >= 0 or self.lcp_every < 1:
            raise ConfigError(f"backward_tol must be >= 0 and lcp_every >= 1, got {self.backward_tol}, {self.lcp_every}")
        for name in ("compile", "warm_start"):
            if getattr(self, name) and self.grad not in ("rbp", "crbp"):
                raise ConfigError(f"{name} applies to the graph-free forward of rbp/crbp; grad {self.grad} has none")
        if self.layout not in LAYOUTS:
            raise ConfigError(f"layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if self.neumann_patience < 1 or not self.neumann_growth_limit >= 1:
            raise ConfigError("neumann_patience and neumann_growth_limit must be >= 1")
        if self.lcp_reduction not in LCP_REDUCTIONS:
            raise ConfigError(f"lcp_reduction must be one of {', '.join(LCP_REDUCTIONS)}, got {self.lcp_reduction!r}")
        if self.lcp_kind not in LCP_KINDS:
            raise ConfigError(f"lcp_kind must be one of {', '.join(LCP_KINDS)}, got {self.lcp_kind!r}")
        if self.loss not in ("focal", "bce", "balanced"):
            raise ConfigError(f"loss must be focal, bce or balanced, got {self.loss!r}")
        try:
            device = self.torch_device()
        except RuntimeError:
            raise ConfigError(f"device must be cpu, cuda or cuda:N, got {self.device!r}") from None
        if device.type not in ("cpu", "cuda"):
            raise ConfigError(f"device must be cpu, cuda or cuda:N, got {self.device!r}")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {self.device!r}: this PyTorch sees no CUDA GPU (torch.cuda.is_available() is False)")


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
    )


class _NeumannLog:
    """One epoch's Neumann solves: per-batch lists (this process) and totals summed over processes."""

    def __init__(self) -> None:
        self.terms: list[int] = []
        self.stop: list[str] = []
        self.ratio: list[float] = []

    def add(self, info: NeumannInfo) -> str:
        self.terms.append(info.terms)
        self.stop.append(info.stop or "none")
        self.ratio.append(round(info.ratio, 4))
        return f"K={info.terms} {info.stop}"

    def summary(self, world: World) -> dict[str, Any]:
        early = sum(s == "growth" and t < EARLY_TERMS for s, t in zip(self.stop, self.terms))
        counts = [len(self.terms), sum(self.terms), sum(t >= GOOD_TERMS for t in self.terms), early,
                  sum(r for r in self.ratio if math.isfinite(r)), *[self.stop.count(s) for s in STOP_REASONS]]
        totals = all_sum([float(c) for c in counts], world)
        n = max(totals[0], 1.0)
        return {
            "terms_mean": totals[1] / n,
            f"share_terms_ge_{GOOD_TERMS}": totals[2] / n,
            f"share_growth_under_{EARLY_TERMS}": totals[3] / n,
            "ratio_mean": totals[4] / n,
            "stop_share": {s: totals[5 + i] / n for i, s in enumerate(STOP_REASONS)},
            "batches": {"terms": self.terms, "stop": self.stop, "ratio": self.ratio},  # this process's batches
        }


def _neumann_warning(epoch: int, summary: dict[str, Any], rule: str) -> str | None:
    share = summary[f"share_growth_under_{EARLY_TERMS}"]
    if share <= EARLY_GROWTH_SHARE:
        return None
    return (
        f"epoch {epoch}: the Neumann series stopped on growth within {EARLY_TERMS} terms in {share:.0%} of the "
        f"batches (mean {summary['terms_mean']:.1f} terms): the gradient is close to one-step backprop. "
        "Raise --penalty-weight (the LCP makes the step contract)"
        + (" or use --neumann-rule patient." if rule == "public" else ".")
    )


def _state_path(out: Path) -> Path:
    return out / "last.state.pt"


def _resume(model, optimizer, out: Path) -> tuple[int, list[dict]]:
    """Load OUT/last.pt and its optimizer state into this run's model; refuses another architecture.
    The learning rate is this run's (`--lr`): resuming with a smaller one is how a run is annealed."""
    ckpt, state_file = out / "last.pt", _state_path(out)
    if not ckpt.exists() or not state_file.exists():
        raise CrbpError(f"--resume: {out} has no last.pt / last.state.pt to resume from")
    loaded = checkpoint.load(ckpt)
    theirs, ours = loaded.config.to_dict(), model.config.to_dict()
    if loaded.arch != model.arch or theirs != ours:
        changed = [k for k, v in ours.items() if theirs.get(k) != v]
        what = (f"a {loaded.arch} model, this run builds a {model.arch}" if loaded.arch != model.arch else
                f"{loaded.arch} with {', '.join(f'{k}={theirs.get(k)}' for k in changed)}, this run builds "
                f"{', '.join(f'{k}={ours[k]}' for k in changed)}")
        raise CrbpError(f"--resume: {ckpt} holds {what}: give the same --model and --model-config, or another --out")
    extra = sorted({k.split(".")[0] for k in loaded.state_dict()} - {k.split(".")[0] for k in model.state_dict()})
    if extra:  # e.g. a shipped model's fitted halting head: it describes the old weights' dynamics
        raise CrbpError(f"--resume: {ckpt} carries {', '.join(extra)} that training does not update (a calibrated, "
                        "shipped model): resume from the training run's own checkpoint")
    model.load_state_dict(loaded.state_dict())
    state = torch.load(state_file, map_location="cpu", weights_only=True)
    lr = [group["lr"] for group in optimizer.param_groups]
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError, TypeError) as err:
        raise CrbpError(f"--resume: {state_file} does not fit {ckpt}'s parameters ({err}): both must come from one run")
    for group, wanted in zip(optimizer.param_groups, lr):  # this run's --lr, not the saved one
        group["lr"] = wanted
    return int(state["epoch"]), list(loaded.meta.get("history", []))


def train(cfg: TrainConfig, out: str | Path, *, resume: bool = False, progress: bool = True,
          on_epoch: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Train and return the last epoch's record (also stored in the checkpoint's metadata).
    `on_epoch(record)` is called on the main process after each epoch's checkpoint is written."""
    world = init_world()
    try:
        return _train(cfg, Path(out), world, resume, progress, on_epoch)
    finally:
        shutdown(world)


def _subset(data: dict, lengths: tuple[int, ...] | None) -> dict:
    """The samples whose contour length is in `lengths` (all for None)."""
    if lengths is None:
        return data
    keep = torch.isin(data["length"], torch.tensor(lengths))
    return {k: v[keep] for k, v in data.items()}


def _plan(cfg: TrainConfig, train_set: dict):
    """The curriculum (None without one), checked against the data before anything is written."""
    if not cfg.curriculum:
        return None
    if "length" not in train_set:
        raise ConfigError(f"--curriculum needs data with contour lengths (pathfinder); {cfg.task} data has none")
    plan = schedule.parse(cfg.curriculum, train_set["length"].tolist(), cfg.epochs)
    for first, lengths in plan.stages:
        n = len(_subset(train_set, lengths)["images"])
        if n < cfg.batch_size:
            raise ConfigError(f"--curriculum stage {first}:{','.join(map(str, lengths))} has {n} training images, "
                              f"fewer than one batch of {cfg.batch_size}")
    return plan


def _train(cfg: TrainConfig, out: Path, world: World, resume: bool, progress: bool, on_epoch) -> dict[str, Any]:
    if cfg.batch_size % world.size:
        raise ConfigError(f"batch_size {cfg.batch_size} must divide evenly over {world.size} processes")
    task = TASKS[cfg.task]
    data = task.training_data(cfg)
    train_set = {k: v[: cfg.max_train] for k, v in data.train.items()} if cfg.max_train else data.train
    n = len(train_set["images"])
    if n < cfg.batch_size:
        raise ConfigError(f"the training set has {n} samples, fewer than one batch of {cfg.batch_size}")
    plan = _plan(cfg, train_set)
    torch.manual_seed(cfg.seed)
    device = cfg.torch_device()
    model = create_model(cfg.model or task.default_model, data.model_config).train()
    model = model.to(device, memory_format=LAYOUTS[cfg.layout])
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    forward_step = compile_step(model, device) if cfg.compile else None
    start, history = (0, [])
    if resume:
        start, history = _resume(model, optimizer, out)
    out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = history[-1] if history else {}
    images = train_set["images"][:REPORT_IMAGES].to(device)
    cache, cache_lengths = None, None  # --warm-start: for the current curriculum stage's training subset
    with _progress(progress and world.is_main) as bar:
        for epoch in range(start, cfg.epochs):
            lengths = plan.lengths(epoch + 1) if plan else None
            subset = _subset(train_set, lengths)
            if cfg.warm_start and (cache is None or lengths != cache_lengths):
                cache, cache_lengths = StateCache(len(subset["images"]), world), lengths
            record = _epoch(cfg, task, model, optimizer, subset, epoch, world, bar, forward_step, cache)
            if lengths is not None:
                record["lengths"] = list(lengths)
            record.update({f"val_{k}": v for k, v in task.train_eval(model.eval(), data.val, cfg.steps).items()})
            _neumann_record(record, cfg, world)
            history.append(record)
            if world.is_main:
                bar.update(bar.task_ids[-1], stats=" ".join(f"{k}={v:.4g}" for k, v in record.items() if isinstance(v, float)))
                _save(cfg, model, optimizer, out, world, history, data.meta, images)
                if on_epoch is not None:
                    on_epoch(record)
            barrier(world)
    return record


def _neumann_record(record: dict, cfg: TrainConfig, world: World) -> None:
    neumann = record.pop("_neumann")
    if not neumann.terms:
        return
    summary = neumann.summary(world)
    record["neumann_terms"] = summary["terms_mean"]
    record[f"neumann_ge_{GOOD_TERMS}"] = summary[f"share_terms_ge_{GOOD_TERMS}"]
    record["neumann"] = summary
    message = _neumann_warning(record["epoch"], summary, cfg.neumann_rule)
    if message:
        record["warnings"] = [message]
        if world.is_main:
            warnings.warn(message, NeumannWarning, stacklevel=3)


def train_step(cfg: TrainConfig, task, model, optimizer, batch: dict, world: World = World(), forward_step=None,
               start_state=None):
    """One optimizer update on `batch` (already on the device): (stats, Solution, step equivalents per image).
    The benchmark (benchmarks/train_throughput.py) times exactly this. `forward_step`, `start_state`:
    solve()'s (--compile, --warm-start)."""
    batch = {**batch, "images": batch["images"].contiguous(memory_format=LAYOUTS[cfg.layout])}
    sol = solve(
        model, batch["images"], steps=cfg.steps, grad=cfg.grad,
        neumann_steps=cfg.neumann_steps, lcp_lambda=cfg.lcp_lambda, lcp_reduction=cfg.lcp_reduction,
        neumann_rule=cfg.neumann_rule, neumann_patience=cfg.neumann_patience,
        neumann_growth_limit=cfg.neumann_growth_limit, forward_tol=cfg.forward_tol, forward_solver=cfg.forward_solver,
        backward_solver=cfg.backward_solver, backward_tol=cfg.backward_tol, lcp_every=cfg.lcp_every,
        lcp_kind=cfg.lcp_kind, forward_step=forward_step, start_state=start_state,
    )
    loss, stats = task.loss(sol.outputs, batch, cfg)
    optimizer.zero_grad(set_to_none=True)
    (loss + cfg.penalty_weight * sol.penalty).backward()
    average_gradients(model.parameters(), world)
    if cfg.clip_grad:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
    optimizer.step()
    stats = {"loss": loss.item(), **stats, "penalty": sol.penalty.item()}
    vjps = len(sol.neumann.v_norms) - 1 if sol.neumann is not None else 0
    work = step_equivalents(cfg.grad, float(sol.forward_steps.float().mean()), vjps, cfg.lcp_every, cfg.lcp_kind)
    return stats, sol, work


def share_at_cap(sol, steps: int) -> float:
    """Share of the batch whose graph-free forward ran all `steps - 1` steps (the last is the recorded one)
    instead of stopping at its tolerance: the trainer's `forward_at_cap`."""
    return float((sol.forward_steps >= steps - 1).float().mean())


def _epoch(cfg: TrainConfig, task, model, optimizer, train_set: dict, epoch: int, world: World, bar,
           forward_step=None, cache: StateCache | None = None) -> dict[str, Any]:
    """One pass over the training set: the epoch's record so far, and its Neumann solves (under `_neumann`).
    `cache` (--warm-start): each image's forward starts from its state there, and leaves its new one."""
    n, local = len(train_set["images"]), cfg.batch_size // world.size
    batches = n // cfg.batch_size
    device = cfg.torch_device()
    job = bar.add_task(f"epoch {epoch + 1}/{cfg.epochs}", total=batches, stats="")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
    sums = {"loss": 0.0, "penalty": 0.0, "forward_steps": 0.0, "at_cap": 0.0}
    # rbp/crbp stopping at a tolerance: a sample that ran all steps - 1 may not be at its fixed point, and its
    # implicit gradient is then of the wrong state (docs/pathfinder_claims.md §11: on long contours this and the
    # backward's budget bent the gradient)
    tracks_cap = cfg.grad in ("rbp", "crbp") and cfg.forward_tol > 0
    neumann, meter = _NeumannLog(), Meter()
    t0 = time.perf_counter()
    model.train()
    for b in range(batches):
        idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size][world.rank * local : (world.rank + 1) * local]
        batch = {k: v[idx].to(device, non_blocking=True) for k, v in train_set.items()}
        t = time.perf_counter()
        start = (lambda cold, idx=idx: cache.start(idx, cold)) if cache is not None else None
        stats, sol, work = train_step(cfg, task, model, optimizer, batch, world, forward_step, start)
        if cache is not None:
            cache.store(idx, sol.state)
        meter.add(local, time.perf_counter() - t, work)
        sums["loss"] += stats["loss"]
        sums["penalty"] += stats["penalty"]
        sums["forward_steps"] += float(sol.forward_steps.float().mean())
        sums["at_cap"] += share_at_cap(sol, cfg.steps)
        text = " ".join(f"{k}={v:.3g}" for k, v in stats.items())
        if sol.neumann is not None:
            text += " " + neumann.add(sol.neumann)
        bar.update(job, advance=1, stats=text)
    totals = all_sum([sums["loss"], sums["penalty"], sums["forward_steps"], sums["at_cap"]], world)
    height, width = train_set["images"].shape[-2:]
    return {
        "epoch": epoch + 1,
        "train_loss": totals[0] / (batches * world.size),
        "train_penalty": totals[1] / (batches * world.size),
        "forward_steps": totals[2] / (batches * world.size),
        **({"forward_at_cap": totals[3] / (batches * world.size)} if tracks_cap else {}),
        "seconds": round(time.perf_counter() - t0, 2),
        **meter.summary(step_gflop(model, height, width), world.size),
        "_neumann": neumann,
    }


def _save(cfg: TrainConfig, model, optimizer, out: Path, world: World, history: list[dict], data_meta: dict,
          report_images) -> None:
    """The epoch's checkpoint (`last.pt`, and `epochN.pt` with --keep-epochs) and optimizer state, atomically."""
    record = history[-1]
    meta = {
        "training": {**cfg.to_dict(), "world_size": world.size, "epochs_done": record["epoch"]},
        "data": {"task": cfg.task, "folder": cfg.data},
        "metrics": {k: v for k, v in record.items() if k.startswith("val_")},
        "throughput": {k: record[k] for k in ("images_per_s", "gflop_per_s", "gflop_per_image")}
        | {"threads": torch.get_num_threads(), "processes": world.size, "device": cfg.device},
        "history": history,
        **data_meta,
    }
    last = record["epoch"] == cfg.epochs
    if last or (cfg.report_every and record["epoch"] % cfg.report_every == 0):
        meta["contraction_report"] = contraction_report(model, report_images)
    checkpoint.save(model, out / "last.pt", meta=meta)
    if cfg.keep_epochs:
        checkpoint.save(model, out / f"epoch{record['epoch']}.pt", meta=meta)
    tmp = _state_path(out).with_suffix(".tmp")
    torch.save({"optimizer": optimizer.state_dict(), "epoch": record["epoch"]}, tmp)
    tmp.replace(_state_path(out))
