"""Steppers: run a model one solver step at a time, so a host can interleave requests between steps.

A `Backend` runs encode -> solve -> readout in one call; a scheduler (serving/scheduler.py) needs the
three apart: encode a request once, step the requests currently in its slots together, read out each
one as it finishes. A `Stepper` is that split, one per runtime:

- `TorchStepper(model)`: the checkpoint's own `encode` / `solver.advance` / `readout`;
- `OrtStepper(path)`: the encoder, one-step body and readout graphs that `export --pieces` writes
  next to the Loop artifact (`model.onnx.pieces/`, see export/pieces.py), run with ONNX Runtime.

A request's state (`State`) is its batch-of-one ctx and h plus the solver's per-sample bookkeeping.
`advance(states)` stacks them, runs ONE `solver.advance` (the same function the solo run and the Loop
body run, so iteration counts match) and unstacks. Rows that may share a step are those with the same
`group(budget)`: the torch stepper takes tol, threshold and patience per row (tensors broadcast in
`advance`), so only the policy must match; an ONNX step graph takes them as scalars, so the whole
budget must.
"""
from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Hashable, Mapping

import numpy as np
import torch
from torch.utils import _pytree as pytree

from ..budget import Budget
from ..errors import CrbpError, InputError
from ..models.solver import stop_reasons
from .base import RANGE_SLACK

#: patience that never runs out: a fixed count on a graph that computes a halting policy
NEVER = 2**62


@dataclass
class State:
    """One request between steps: its ctx and state (batch of one), the solver's bookkeeping, its budget."""

    ctx: Any
    h: Any
    budget: Budget
    iterations: int = 0
    residual: float = math.inf
    streak: int = 0
    active: bool = True

    @property
    def cap(self) -> int:
        return self.budget.iters if self.budget.iters is not None else self.budget.max_iters

    def stopped(self) -> str | None:
        """Why this request is done (solver.stop_reasons), or None while it still runs."""
        if self.active and self.iterations < self.cap:
            return None
        return stop_reasons([self.iterations], [self.residual], self.budget.kwargs())[0]


def solver_tol(budget: Budget) -> float:
    """The solver's per-sample threshold: tol for early exit, -1 (only divergence stops) for a fixed count."""
    return float(budget.tol) if budget.early_exit else -1.0


class Stepper(ABC):
    """encode / advance / readout of one model on one runtime; not thread-safe (one scheduler drives it)."""

    name: str = ""
    in_channels: int = 3
    size_multiple: int = 1
    heads: tuple[str, ...] = ()
    default_budget: Budget

    def budget(self, request: Mapping[str, Any] | Budget | None = None) -> Budget:
        """The request's budget keys over this stepper's default, or a Budget as it is; InputError naming the
        problem (Budget's rules, or a policy this model cannot run)."""
        if isinstance(request, Budget):
            return request
        return self.default_budget.merge(dict(request or {}))

    def check_image(self, image: np.ndarray) -> np.ndarray:
        """H x W x C float in [0, 1] -> validated float32 (InputError naming what is wrong)."""
        if not isinstance(image, np.ndarray):
            raise InputError(f"image must be a numpy array, got {type(image).__name__}")
        if image.ndim != 3 or image.shape[2] != self.in_channels or 0 in image.shape:
            raise InputError(f"image must be H x W x {self.in_channels}, got shape {tuple(image.shape)}")
        if not np.issubdtype(image.dtype, np.floating):
            raise InputError(f"image must be floating point in [0, 1], got {image.dtype} (divide uint8 by 255)")
        image = np.asarray(image, dtype=np.float32)
        if not np.isfinite(image).all():
            raise InputError("image contains NaN or infinite values")
        lo, hi = float(image.min()), float(image.max())
        if lo < -RANGE_SLACK or hi > 1 + RANGE_SLACK:
            raise InputError(f"image must be in [0, 1], got values in [{lo:.4g}, {hi:.4g}] (divide uint8 by 255)")
        return image

    @abstractmethod
    def group(self, budget: Budget) -> Hashable:
        """Requests whose budgets give the same key may share one `advance`."""

    @abstractmethod
    def encode(self, images: np.ndarray, budget: Budget) -> State:
        """1 x C x H x W float32 (H, W multiples of `size_multiple`) -> the state before the first step."""

    @abstractmethod
    def advance(self, states: list[State]) -> None:
        """One solver step over `states` (all running, one size, one group), updated in place."""

    @abstractmethod
    def readout(self, state: State) -> dict[str, np.ndarray]:
        """The heads of the current state, {name: 1 x C x H x W float32}."""


def _check_batch(states: list[State]) -> None:
    if not states:
        raise InputError("advance needs at least one state")
    if not all(s.active for s in states):
        raise InputError("advance takes running states only: a finished request leaves its slot")


class TorchStepper(Stepper):
    """A checkpoint's own encode / step / readout in fp32 eager PyTorch; per-row tol, threshold, patience."""

    name = "torch"

    def __init__(self, model, *, threads: int | None = None, device: str = "cpu"):
        from ..modelcard import ModelCard
        from ..models import RecurrentSegmenter

        if not isinstance(model, RecurrentSegmenter):
            raise InputError(f"TorchStepper needs a RecurrentSegmenter, got {type(model).__name__}")
        if threads is not None:
            if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
                raise InputError(f"threads must be a positive integer, got {threads!r}")
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.in_channels = model.in_channels
        self.size_multiple = int(getattr(model, "stride", 1) or 1)
        self.default_budget = ModelCard.of(model).budget

    def budget(self, request: Mapping[str, Any] | Budget | None = None) -> Budget:
        from ..models.solver import Halting

        budget = super().budget(request)
        if budget.early_exit and budget.policy != "tol":
            Halting.of(self.model, budget.policy, budget.threshold, budget.patience)  # e.g. learned without a head
        return budget

    def group(self, budget: Budget) -> Hashable:
        return budget.policy if budget.early_exit else "tol"

    @torch.no_grad()
    def encode(self, images: np.ndarray, budget: Budget) -> State:
        x = torch.as_tensor(images, dtype=torch.float32, device=self.device)
        self.model.check_images(x)
        ctx = self.model.encode(x)
        return State(ctx=ctx, h=self.model.init_state(ctx), budget=budget)

    def _halting(self, states: list[State]):
        from ..models.halting import HaltRule
        from ..models.solver import Halting

        first = states[0].budget
        if not first.early_exit or first.policy == "tol":
            return None
        threshold = torch.tensor([float(s.budget.threshold) for s in states], dtype=torch.float32, device=self.device)
        patience = torch.tensor([s.budget.patience for s in states], dtype=torch.int64, device=self.device)
        return Halting(HaltRule(first.policy, first.threshold, first.patience), self.model, threshold, patience)

    @torch.no_grad()
    def advance(self, states: list[State]) -> None:
        from ..models import solver

        _check_batch(states)
        if len({self.group(s.budget) for s in states}) != 1:
            raise InputError("advance takes states of one group (the same halting policy)")
        dev = self.device
        one = len(states) == 1
        ctx = states[0].ctx if one else pytree.tree_map(lambda *t: torch.cat(t), *(s.ctx for s in states))
        h = states[0].h if one else torch.cat([s.h for s in states])
        tol = torch.tensor([solver_tol(s.budget) for s in states], dtype=torch.float32, device=dev)
        h, active, iterations, residual, streak = solver.advance(
            self.model.step, ctx, h,
            torch.ones(len(states), dtype=torch.bool, device=dev),
            torch.tensor([s.iterations for s in states], dtype=torch.int64, device=dev),
            torch.tensor([s.residual for s in states], dtype=torch.float32, device=dev),
            torch.tensor([s.streak for s in states], dtype=torch.int64, device=dev),
            tol, halting=self._halting(states),
        )
        rows = zip(*(t.cpu().tolist() for t in (active, iterations, residual, streak)))  # one sync, not one per row
        for i, (s, (a, n, r, k)) in enumerate(zip(states, rows)):
            s.h, s.active, s.iterations, s.residual, s.streak = h[i : i + 1], a, n, r, k

    @torch.no_grad()
    def readout(self, state: State) -> dict[str, np.ndarray]:
        out = self.model.readout(state.ctx, state.h)
        return {k: v.detach().float().cpu().numpy() for k, v in out.items()}


def load_stepper(artifact_path: Any, backend: str = "auto", threads: int | None = 1) -> Stepper:
    """A stepper for `artifact_path`: a model object, a checkpoint / bundled model / registered architecture
    (torch), or a loop `.onnx` exported with its pieces (onnxruntime). `backend` forces one ("torch",
    "onnxruntime"/"ort"); `threads` is the runtime's intra-op thread count."""
    from ..models import RecurrentSegmenter
    from ..sources import resolve

    kind = {"ort": "onnxruntime"}.get(backend, backend)
    if kind not in ("auto", "torch", "onnxruntime"):
        raise InputError(f"unknown stepper backend {backend!r}; use auto, torch or onnxruntime")
    if isinstance(artifact_path, RecurrentSegmenter):
        if kind == "onnxruntime":
            raise InputError("a model object steps on torch; export it with --pieces to step it on onnxruntime")
        return TorchStepper(artifact_path, threads=threads)
    if not isinstance(artifact_path, (str, os.PathLike)):
        raise InputError(f"cannot make a stepper from {type(artifact_path).__name__}; "
                         "give a model, a .pt or an .onnx path")
    source = resolve(artifact_path)
    if source.kind == "onnx":
        if kind == "torch":
            raise InputError(f"{source.path} is an ONNX artifact; it steps on onnxruntime, not torch")
        return OrtStepper(source.path, threads=threads)
    if source.kind == "engine":
        raise InputError(f"{source.path} is a TensorRT engine: no stepper runs it; use its .onnx or checkpoint")
    if kind == "onnxruntime":
        raise InputError(f"{source.label} is a checkpoint; export it with --pieces to step it on onnxruntime")
    return TorchStepper(source.load_model(), threads=threads)


class OrtStepper(Stepper):
    """The pieces of a loop artifact (export/pieces.py) on ONNX Runtime: one session per piece.

    The step graph takes tol / threshold / patience as scalars, so only requests with the same budget
    share a step (`group`); the halting policy is the one the artifact was exported with."""

    name = "onnxruntime"

    def __init__(self, path: str | os.PathLike, *, threads: int | None = 1, providers: list[str] | None = None):
        from ..export.pieces import FILES, read_spec

        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise InputError(f"threads must be a positive integer, got {threads!r}")
        self.path = Path(path)
        folder, spec, self.meta = read_spec(self.path)
        if self.meta.strategy != "loop" or self.meta.substeps != 1:
            raise CrbpError(f"{folder}: pieces of a {self.meta.strategy} export with {self.meta.substeps} steps per "
                            "trip; the stepper needs a loop export with one")
        self.ctx_names, self.heads = tuple(spec["ctx"]), tuple(spec["heads"])
        self.in_channels, self.size_multiple = self.meta.in_channels, self.meta.size_multiple
        self.default_budget = self.meta.budget
        self.policy, self.precision = self.meta.policy, self.meta.precision
        self.sessions = {piece: self._session(folder / name, threads, providers) for piece, name in FILES.items()}
        # the exporter drops an input its piece never reads (the Pathfinder readouts read h, not ctx)
        self.inputs = {piece: {i.name for i in s.get_inputs()} for piece, s in self.sessions.items()}

    @property
    def providers(self) -> list[str]:
        return self.sessions["step"].get_providers()

    @staticmethod
    def _session(path: Path, threads: int | None, providers: list[str] | None):
        import onnxruntime as ort

        from .ort_backend import default_providers

        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads is not None:
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        try:
            return ort.InferenceSession(str(path), options, providers=providers or default_providers())
        except Exception as exc:  # onnxruntime's own exception types
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise CrbpError(f"{path}: onnxruntime cannot load it ({first})") from None

    def budget(self, request: Mapping[str, Any] | Budget | None = None) -> Budget:
        """As the Loop artifact: a request may set tol, max_iters, threshold and patience, a fixed count, or the
        tol policy (the step's policy then never stops a sample), but not another policy than the step computes."""
        given = request.kwargs() if isinstance(request, Budget) else dict(request or {})
        policy = given.get("policy", "tol")
        if policy not in (None, "tol", self.policy):
            Budget.DEFAULT.merge({k: given.get(k) for k in ("policy", "threshold", "patience")})
            raise InputError(f"{self.path.name}'s step computes the {self.policy} halting policy; a request may set "
                             f"its threshold and patience, not another policy ({policy}): "
                             f"re-export with --policy {policy}")
        return super().budget(request)

    def group(self, budget: Budget) -> Hashable:
        return budget

    def _run(self, piece: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return self.sessions[piece].run(None, {k: v for k, v in feeds.items() if k in self.inputs[piece]})
        except Exception as exc:  # onnxruntime's own exception types; keep its first line
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise CrbpError(f"{self.path.name}: onnxruntime failed in the {piece} piece ({first})") from exc

    def encode(self, images: np.ndarray, budget: Budget) -> State:
        if images.shape[-2] % self.size_multiple or images.shape[-1] % self.size_multiple:
            raise InputError(f"image size {images.shape[-2]}x{images.shape[-1]} must be a multiple of the model "
                             f"stride {self.size_multiple}")
        *ctx, h = self._run("encode", {"images": np.ascontiguousarray(images, dtype=np.float32)})
        return State(ctx=ctx, h=h, budget=budget)

    def advance(self, states: list[State]) -> None:
        _check_batch(states)
        budget = states[0].budget
        if any(s.budget != budget for s in states):
            raise InputError("advance takes states of one group (the same budget)")
        n = len(states)
        cat = (lambda xs: xs[0]) if n == 1 else np.concatenate
        feeds = {name: cat([s.ctx[i] for s in states]) for i, name in enumerate(self.ctx_names)}
        feeds.update(h=cat([s.h for s in states]), active=np.ones(n, dtype=bool),
                     iterations=np.array([s.iterations for s in states], dtype=np.int64),
                     residual=np.array([s.residual for s in states], dtype=np.float32),
                     streak=np.array([s.streak for s in states], dtype=np.int64),
                     tol=np.array(solver_tol(budget), dtype=np.float32))
        if self.policy != "tol":  # a fixed count on a policy graph: a patience that never runs out
            fixed = not budget.early_exit or budget.policy == "tol"
            feeds["threshold"] = np.array(0.0 if fixed else budget.threshold, dtype=np.float32)
            feeds["patience"] = np.array(NEVER if fixed else budget.patience, dtype=np.int64)
        _, h, active, iterations, residual, streak = self._run("step", feeds)
        for i, s in enumerate(states):
            s.h = h[i : i + 1]
            s.active, s.iterations = bool(active[i]), int(iterations[i])
            s.residual, s.streak = float(residual[i]), int(streak[i])

    def readout(self, state: State) -> dict[str, np.ndarray]:
        feeds = {name: state.ctx[i] for i, name in enumerate(self.ctx_names)}
        values = self._run("readout", {**feeds, "h": state.h})
        return {name: np.asarray(v, dtype=np.float32) for name, v in zip(self.heads, values)}
