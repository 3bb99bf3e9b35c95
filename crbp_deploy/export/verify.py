"""Verify an exported artifact against the PyTorch model it came from.

Random images at several sizes and batch sizes, with a different contrast per sample so samples
converge after different numbers of steps; every output is compared (max abs / rel error) and
per-sample iteration counts must be identical. The report is written into the artifact's sidecar.

Hook for task-level parity (e.g. PQ on a generated panoptic split): pass `checks`, callables
`check(reference: Backend, candidate: Backend) -> dict` returning at least {"name", "passed"};
their results land in the report and a failed one fails verification.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..artifact import read_sidecar, write_sidecar
from ..errors import CrbpError, InputError
from ..precision import tolerance
from ..runtime import OrtBackend, TorchBackend

Check = Callable[[Any, Any], dict]


@dataclass
class VerifyReport:
    artifact: str
    backend: str
    precision: str
    providers: list[str]
    strategy: str
    budget: dict[str, Any]
    atol: float
    rtol: float
    seed: int
    cases: list[dict[str, Any]] = field(default_factory=list)
    worst: dict[str, dict[str, float]] = field(default_factory=dict)
    iterations_match: bool = True
    checks: list[dict[str, Any]] = field(default_factory=list)
    passed: bool = True
    seconds: float = 0.0
    sidecar: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        worst = ", ".join(f"{k} max abs {v['max_abs']:.3g} / rel {v['max_rel']:.3g}" for k, v in self.worst.items())
        head = "PASSED" if self.passed else "FAILED"
        lines = [f"verify {head}: {self.artifact} ({self.strategy}, {self.budget}) on {self.backend} {self.precision}: {worst}"]
        for case in self.cases:
            if not case["ok"]:
                bad = [k for k, v in case["outputs"].items() if not v["ok"]]
                it = case["iterations"]
                lines.append(
                    f"  {case['batch']}x{case['size'][0]}x{case['size'][1]}: mismatch in {', '.join(bad)}; "
                    f"iterations torch {it['reference']} vs artifact {it['candidate']}"
                )
        lines += [f"  check {c.get('name')}: {'ok' if c.get('passed') else 'FAILED'}" for c in self.checks]
        return "\n".join(lines)


LABEL_MISMATCH = 1e-3


def _iterations_match(ref: np.ndarray, got: np.ndarray | None, slack: float) -> bool:
    """Identical counts (slack 0, fp32), or each within slack x the reference count (reduced precision)."""
    if got is None or np.shape(ref) != np.shape(got):
        return False
    if slack == 0:
        return bool(np.array_equal(ref, got))
    ref64, got64 = np.asarray(ref, np.int64), np.asarray(got, np.int64)
    return bool(np.all(np.abs(ref64 - got64) <= np.ceil(slack * ref64)))


def _compare(ref: np.ndarray, got: np.ndarray, atol: float, rtol: float) -> dict[str, Any]:
    if ref.shape != got.shape:
        return {"ok": False, "max_abs": float("inf"), "max_rel": float("inf"),
                "shape": {"reference": list(ref.shape), "candidate": list(got.shape)}}
    if ref.dtype.kind in "iub":
        diff = np.abs(ref.astype(np.int64) - got.astype(np.int64))
        mismatch = float((diff != 0).mean()) if diff.size else 0.0
        # A label map (N x H x W) is an argmax: a float near-tie may flip a pixel between runtimes,
        # so maps pass with at most LABEL_MISMATCH of their pixels different; counts must be exact.
        limit = LABEL_MISMATCH if ref.ndim >= 3 else 0.0
        return {"ok": mismatch <= limit, "max_abs": float(diff.max(initial=0)), "max_rel": float(diff.max(initial=0)),
                "mismatch_fraction": mismatch}
    ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
    both_inf = np.isinf(ref64) & (ref64 == got64)
    diff = np.where(both_inf, 0.0, np.abs(ref64 - got64))
    scale = float(np.abs(np.where(np.isfinite(ref64), ref64, 0)).max()) if ref64.size else 0.0
    max_abs = float(diff.max()) if diff.size else 0.0
    ok = bool(np.all(diff <= atol + rtol * np.abs(np.where(both_inf, 0.0, ref64))))
    return {"ok": ok, "max_abs": max_abs, "max_rel": max_abs / scale if scale > 0 else max_abs}


def sample_images(batch: int, channels: int, size: tuple[int, int], seed: int) -> np.ndarray:
    """Uniform noise scaled by a per-sample contrast (0.1 .. 1): samples need different budgets."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, channels, *size, generator=gen)
    contrast = torch.linspace(0.1, 1.0, batch) if batch > 1 else torch.ones(1)
    return (images * contrast.view(-1, 1, 1, 1)).numpy()


def verify(
    artifact_path: str | os.PathLike,
    model: torch.nn.Module,
    *,
    sizes: Sequence[tuple[int, int]] | None = None,
    batches: Sequence[int] | None = None,
    seed: int = 0,
    atol: float | None = None,
    rtol: float | None = None,
    max_iters: int | None = None,
    tol: float | None = None,
    backend: Any | None = None,
    checks: Sequence[Check] = (),
    write: bool = True,
) -> VerifyReport:
    """Compare the artifact (run by `backend`, default `OrtBackend(artifact_path)`) with `model`.

    Sizes default to 32x32 and 48x64, batches to 1 and 3 (a static export: its own shape). The
    budget is the artifact's default unless `max_iters` / `tol` are given (loop artifacts).
    Tolerances default to those of the candidate's precision (`crbp_deploy.precision.TOLERANCES`):
    fp32 needs identical per-sample iterations, bf16 / fp16 a documented relative slack.
    Raises CrbpError (with `.report`) on any mismatch, after writing the report to the sidecar.
    """
    started = time.perf_counter()
    path = Path(artifact_path)
    candidate = backend if backend is not None else OrtBackend(path)
    static = getattr(candidate, "input_shape", None) or []
    static = static if all(isinstance(d, int) for d in static) and static else None
    sizes = sizes if sizes is not None else ([tuple(static[2:])] if static else [(32, 32), (48, 64)])
    batches = batches if batches is not None else ([static[0]] if static else [1, 3])
    if not sizes or not batches:
        raise InputError("verify needs at least one size and one batch size")
    limits = tolerance(getattr(candidate, "precision", "fp32"))
    atol = limits.atol if atol is None else atol
    rtol = limits.rtol if rtol is None else rtol
    for name, value in (("atol", atol), ("rtol", rtol)):
        if not (isinstance(value, (int, float)) and np.isfinite(value) and value >= 0):
            raise InputError(f"{name} must be a finite number >= 0, got {value!r}")
    reference = TorchBackend(model)
    budget = candidate.resolve_budget(None, max_iters, tol)
    report = VerifyReport(
        artifact=path.name,
        backend=candidate.name,
        precision=getattr(candidate, "precision", "fp32"),
        providers=list(getattr(candidate, "providers", [])),
        strategy=candidate.strategy,
        budget=budget.kwargs(),
        atol=atol,
        rtol=rtol,
        seed=seed,
    )
    for i, size in enumerate(sizes):
        for batch in batches:
            images = sample_images(batch, candidate.in_channels, tuple(size), seed + 1000 * i + batch)
            case = _case(reference, candidate, images, budget.kwargs(), atol, rtol, limits.iterations)
            report.iterations_match &= case.pop("iterations_ok")
            report.cases.append(case)
            for name, v in case["outputs"].items():
                w = report.worst.setdefault(name, {"max_abs": 0.0, "max_rel": 0.0})
                w["max_abs"] = max(w["max_abs"], v["max_abs"])
                w["max_rel"] = max(w["max_rel"], v["max_rel"])
    for check in checks:
        result = dict(check(reference, candidate))
        result.setdefault("name", getattr(check, "__name__", "check"))
        result["passed"] = bool(result.get("passed"))
        report.checks.append(result)
    report.passed = all(c["ok"] for c in report.cases) and all(c["passed"] for c in report.checks)
    report.seconds = time.perf_counter() - started
    if write:
        report.sidecar = _record(path, report)
    if not report.passed:
        error = CrbpError(report.summary())
        error.report = report
        raise error
    return report


def _case(reference, candidate, images: np.ndarray, budget: dict, atol: float, rtol: float, slack: float) -> dict:
    """One batch through both runtimes: every output compared, per-sample iterations matched."""
    ref = reference.run(images, **budget)
    got = candidate.run(images, **(budget if candidate.strategy != "unrolled" else {}))
    outputs = {}
    for name in ref.outputs:
        if name not in got.outputs:
            outputs[name] = {"ok": False, "max_abs": float("inf"), "max_rel": float("inf"), "missing": True}
            continue
        outputs[name] = _compare(ref[name], got[name], atol, rtol)
    same_iters = _iterations_match(ref["iterations"], got.outputs.get("iterations"), slack)
    return {
        "size": list(images.shape[2:]),
        "batch": len(images),
        "iterations": {"reference": ref["iterations"].tolist(),
                       "candidate": np.asarray(got.outputs.get("iterations", [])).tolist()},
        "residual": {"reference": ref["residual"].tolist()},
        "outputs": outputs,
        "timings_ms": {"reference": ref.telemetry["timings"]["total_ms"], "candidate": got.telemetry["timings"]["total_ms"]},
        "ok": same_iters and all(v["ok"] for v in outputs.values()),
        "iterations_ok": same_iters,
    }


def _record(path: Path, report: VerifyReport) -> str | None:
    """Write the report into the sidecar when the sidecar describes this very file."""
    sidecar = read_sidecar(path)
    if sidecar is None:
        return None
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if sidecar.get("sha256") != digest:
        return None  # a sidecar of another export: leave it alone rather than mislabel it
    sidecar["verification"] = report.to_dict()
    return str(write_sidecar(path, sidecar))


def pq_parity_check(data: str | os.PathLike, meta: dict[str, Any], *, limit: int = 24, max_delta: float = 0.1) -> Check:
    """A `checks` entry: PQ of the artifact vs PyTorch on real images of a COCO panoptic split.

    Real images exercise what random inputs do not (confident heads, the grouping); the two PQs
    must agree within `max_delta` points (the issue's |dPQ| <= 0.1).
    """
    from ..panoptic.predict import PanopticPredictor
    from ..tasks import PANOPTIC

    dataset = PANOPTIC.open(data)

    def pq_parity(reference, candidate) -> dict[str, Any]:
        budget = candidate.default_budget.kwargs()
        results = {}
        for name, backend in (("reference", reference), ("candidate", candidate)):
            predictor = PanopticPredictor.from_backend(backend, meta, budget=budget)
            predictor.stride = getattr(candidate, "size_multiple", 1) or 1
            res = PANOPTIC.evaluate(predictor, dataset, limit=limit)
            results[name] = {"pq": res["pq"]["all"], "mean_iterations": res["iterations"]["mean"]}
        delta = abs(results["reference"]["pq"] - results["candidate"]["pq"])
        return {"name": "pq_parity", "passed": delta <= max_delta, "delta_pq": delta, "max_delta": max_delta,
                "images": min(limit, len(dataset)) if limit else len(dataset), **results}

    return pq_parity


def parity_checks(model, data: str | os.PathLike | None, workdir: Path, max_delta: float) -> list[Check]:
    """The task-level checks of an export: for a task with one (panoptic), quality parity on `data`,
    by default a small split generated into `workdir` at the card's image size."""
    from ..modelcard import ModelCard
    from ..tasks import task_of

    task = task_of(model)
    if not task.parity_images or not ModelCard.of(model).categories:  # untrained: its card names nothing to score
        return []
    if data is None:
        data = task.generate(workdir / "pq", task.parity_images, ModelCard.of(model).image_size, seed=2024)
    return [pq_parity_check(data, model.meta, max_delta=max_delta)]


def verify_export(artifact: Path, model, *, data=None, sizes=None, batches=None, backend: str = "onnxruntime",
                  precision: str = "fp32") -> VerifyReport | dict:
    """`verify` with the task's parity checks (fp16: and what ran in fp16), by default at two sizes that are
    multiples of the model's stride; an fp16 graph onnxruntime has no kernels for: a skipped report (a dict)."""
    from ..runtime import load_backend
    from .fp16 import artifact_precision, execution_check, missing_kernel, skip_verification

    fp16 = backend in ("onnxruntime", "ort") and artifact_precision(artifact) == "fp16"
    m = int(getattr(model, "stride", 1) or 1)
    try:
        candidate = load_backend(artifact, backend, precision=precision)  # a missing runtime fails before any work
        limits = tolerance(getattr(candidate, "precision", precision))  # an fp16 artifact: the fp16 tolerances
        with tempfile.TemporaryDirectory() as tmp:
            checks = parity_checks(model, data, Path(tmp), limits.pq) + ([execution_check(artifact)] if fp16 else [])
            return verify(artifact, model, sizes=sizes or [(32 * m, 32 * m), (24 * m, 40 * m)], batches=batches, checks=checks,
                          backend=candidate)
    except CrbpError as exc:
        if fp16 and missing_kernel(exc):
            return skip_verification(artifact, exc)
        raise
