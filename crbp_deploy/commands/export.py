"""`crbp-deploy export` and `crbp-deploy verify`: ONNX (and TensorRT) artifacts checked against PyTorch."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ..errors import CrbpError, InputError


def _parse_size(size: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise InputError(f"--size must look like 64x64, got {size!r}") from None
    return h, w


def _strategy_budget(m, strategy: Optional[str], iters: Optional[int], max_iters: Optional[int],
                     tol: Optional[float], rule: dict) -> tuple[str, dict]:
    """The graph strategy and the budget it is exported with (early exit: the options over the card's,
    halting policy included; `rule`: --policy / --threshold / --patience as given)."""
    from ..modelcard import ModelCard

    given = {k: v for k, v in rule.items() if v is not None}
    if iters is not None:
        if given:
            raise InputError("--policy/--threshold/--patience set early exit's halting; --iters is a fixed count")
        strategy = strategy or "unrolled"  # measured faster per iteration on ONNX Runtime CPU
        return strategy, {"iters": iters} if strategy == "unrolled" else {"max_iters": iters, "tol": 0.0}
    if strategy not in (None, "loop"):
        raise InputError("early exit needs the loop strategy; use --iters N for an unrolled graph")
    card = ModelCard.of(m).budget.early()
    request = {"max_iters": max_iters or card.max_iters, "tol": card.tol if tol is None else tol, **given}
    return "loop", card.merge(request).kwargs()


def _fp16_conversion_lines(result) -> None:
    from ..artifact import read_sidecar

    conv = read_sidecar(result.path)["fp16_conversion"]
    kept = ", ".join(f"{op} x{n}" if n > 1 else op for op, n in conv["kept_fp32_ops"].items())
    extra = ", tol, the Loop's condition and counters" if result.strategy == "loop" else ""
    typer.echo(f"fp16 ({conv['converter']}): {conv['fp16_initializers']} fp16 initializers; inputs/outputs{extra} "
               f"and the convergence test stay fp32 (kept fp32: {kept})")
    if conv.get("clamped_values"):
        typer.echo(f"  warning: {conv['clamped_values']} constant value(s) lie outside fp16's range and were clamped "
                   f"into [{conv['range'][0]:g}, {conv['range'][1]:g}] in magnitude")


def _verify(artifact: Path, model, pq_data: Optional[Path], sizes, batches, backend: str = "onnxruntime",
            precision: str = "fp32") -> dict:
    from ..export.fp16 import artifact_precision
    from ..export.verify import verify_export

    report = verify_export(artifact, model, data=pq_data, sizes=sizes, batches=batches, backend=backend,
                           precision=precision)
    if isinstance(report, dict):  # an fp16 graph onnxruntime has no kernels for
        typer.echo(f"verify SKIPPED: {artifact} (fp16): {report['reason']}")
        return report
    typer.echo(report.summary())
    for check in report.checks:
        if check.get("informational"):  # the full numbers are in the sidecar
            typer.echo(f"  {check['name']}: {check.get('note', '')}")
            continue
        typer.echo(f"  {check['name']}: " + json.dumps({k: v for k, v in check.items() if k != "name"}))
    if backend in ("onnxruntime", "ort") and artifact_precision(artifact) == "fp16":
        _fp16_lines(report)
    return report.to_dict()


def _fp16_lines(report) -> None:
    from ..precision import tolerance

    limits = tolerance("fp16")
    iters = [(c["iterations"]["reference"], c["iterations"]["candidate"]) for c in report.cases]
    same = sum(a == b for a, b in iters)
    typer.echo(f"  fp16 tolerances (crbp_deploy/precision.py): heads atol {limits.atol} / rtol {limits.rtol}, "
               f"iterations within {limits.iterations:.0%}; per-sample iterations identical in {same} of "
               f"{len(iters)} cases: " + "; ".join(f"torch {a} vs onnx {b}" for a, b in iters))
    if not any(p != "CPUExecutionProvider" for p in report.providers):
        typer.echo("  not verified here: fp16 execution on a GPU (TensorRT, onnxruntime CUDA) -- no GPU on this "
                   "machine; onnxruntime CPU checks the fp16 graph, weights and casts (see fp16_execution)")


def export(
    model: Optional[str] = typer.Argument(None, help="Checkpoint or bundled model name (default: the bundled model)."),
    fmt: str = typer.Option("onnx", "--format", help="onnx | tensorrt"),
    iters: Optional[int] = typer.Option(None, "--iters", help="Fixed count of recurrent steps."),
    until_converged: bool = typer.Option(False, "--until-converged", help="Early exit (the default strategy)."),
    max_iters: Optional[int] = typer.Option(None, "--max-iters", help="Early exit: default cap (a graph input)."),
    tol: Optional[float] = typer.Option(None, "--tol", help="Early exit: default tolerance (a graph input)."),
    strategy: Optional[str] = typer.Option(None, "--strategy", help="Graph for a fixed count: unrolled (default) | loop."),
    policy: Optional[str] = typer.Option(None, "--policy", help="Halting policy computed in the Loop: tol | estimate | stable | learned (default: the card's)."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="The policy's default threshold (a graph input)."),
    patience: Optional[int] = typer.Option(None, "--patience", help="Steps in a row the policy must fire (a graph input)."),
    loop: Optional[str] = typer.Option(
        None, "--loop", help="Loop body: compact (only unconverged samples are stepped; default for ONNX Runtime) | "
        "masked (fixed shapes; default for --format tensorrt, whose loops take no shrinking batch)."),
    postprocess: bool = typer.Option(False, "--postprocess", help="Panoptic models: also output the panoptic labels."),
    dynamic: bool = typer.Option(True, "--dynamic/--static", help="Dynamic batch and image size."),
    size: str = typer.Option("64x64", "--size", help="Example (or, with --static, fixed) image size HxW."),
    batch: int = typer.Option(1, "--batch", help="Batch size of a --static export."),
    fp16: bool = typer.Option(
        False, "--fp16", help="fp16 graph (onnxconverter-common): math in fp16, inputs/outputs and the convergence "
        "test (residual, tol) in fp32. Needs pip install 'crbp-deploy[fp16]'."),
    opset: int = typer.Option(18, "--opset"),
    pieces: bool = typer.Option(False, "--pieces", help="Early exit: also write encoder, one step and readout as "
                                "standalone graphs in OUT.pieces/ (for the iteration-level scheduler)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output .onnx (default: export/<model>-<strategy>.onnx)."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip verification against PyTorch."),
    pq_data: Optional[Path] = typer.Option(None, "--pq-data", help="COCO panoptic split for PQ parity (default: generated)."),
) -> None:
    """Export to ONNX (and a TensorRT engine) with a fixed count or an early-exit loop, then verify."""
    from ..sources import resolve_model
    from ..export import export_onnx
    from ..modelcard import ModelCard

    if fmt not in ("onnx", "tensorrt"):
        raise InputError(f"--format must be onnx or tensorrt, got {fmt!r}")
    if iters is not None and (until_converged or max_iters is not None or tol is not None):
        raise InputError("--iters (fixed count) and --until-converged/--max-iters/--tol (early exit) exclude each other")
    if fmt == "tensorrt":
        from ..export.tensorrt import tensorrt_available

        if not tensorrt_available():
            raise CrbpError("--format tensorrt needs TensorRT and a CUDA device; neither is usable here")
    if fp16:
        from ..export.fp16 import require_converter

        require_converter()  # one line naming the package and how to install it, before any work
    m, source = resolve_model(model)
    strategy, budget = _strategy_budget(m, strategy, iters, max_iters, tol,
                                        {"policy": policy, "threshold": threshold, "patience": patience})
    if postprocess:
        from ..export.panoptic_graph import WithPanopticLabels
        m = WithPanopticLabels(m, ModelCard.of(m).postprocess)
    name = Path(source.split(":")[-1]).stem
    out = out or Path("export") / f"{name}-{strategy}{'-pp' if postprocess else ''}{'-fp16' if fp16 else ''}.onnx"
    if loop not in (None, "compact", "masked"):
        raise InputError(f"--loop must be compact or masked, got {loop!r}")
    if loop is not None and strategy != "loop":
        raise InputError("--loop applies to the loop strategy (early exit or --strategy loop)")
    execution = (loop or ("masked" if fmt == "tensorrt" else "compact")) if strategy == "loop" else None
    result = export_onnx(
        m, out, strategy=strategy, opset=opset, dynamic=dynamic, fp16=fp16, example_size=_parse_size(size),
        batch=batch, source=source, execution=execution, pieces=pieces, **budget,
    )
    body, also = f" ({execution})" if execution else "", f"; pieces in {result.pieces}/" if result.pieces else ""
    typer.echo(f"exported {result.path} ({result.size_bytes / 1e6:.2f} MB, {result.strategy}{body}, {budget}) in "
               f"{result.seconds:.1f} s{also}")
    if fp16:
        _fp16_conversion_lines(result)
    from ..export.trt_lint import lint_tensorrt

    lint = lint_tensorrt(result.path)  # checkable without a GPU: what TensorRT's ONNX parser would reject
    typer.echo(lint.summary().splitlines()[0])
    if not no_verify:
        _verify(result.path, m, pq_data, None if dynamic else [_parse_size(size)], None if dynamic else [batch])
    if fmt == "tensorrt":
        from ..export.tensorrt import build_engine, engine_shapes

        shapes = engine_shapes(m, _parse_size(size), batch, dynamic)
        engine = build_engine(result.path, result.path.with_suffix(".engine"), fp16=fp16, **shapes)
        typer.echo(f"built TensorRT engine {engine.path} in {engine.seconds:.1f} s (TensorRT {engine.tensorrt})")


def verify(
    artifact: Path = typer.Argument(..., help="Exported .onnx file."),
    against: Optional[str] = typer.Option(None, "--against", help="Checkpoint or bundled model it came from (default: bundled)."),
    pq_data: Optional[Path] = typer.Option(None, "--pq-data", help="COCO panoptic split for PQ parity (default: generated)."),
    backend: str = typer.Option("onnxruntime", "--backend", help="Runtime to check: onnxruntime | openvino."),
    precision: str = typer.Option("fp32", "--precision", help="openvino: fp32 | bf16 (held to the tolerances in docs/precision.md)."),
) -> None:
    """Compare an artifact with PyTorch: outputs, per-sample iterations, and PQ parity for panoptic models."""
    from ..sources import resolve_model
    from ..artifact import read_card, read_sidecar

    if not artifact.is_file():
        raise InputError(f"{artifact}: no such artifact")
    m, _ = resolve_model(against)
    sidecar = read_sidecar(artifact) or {}
    if any(o.get("name") == "panoptic" for o in sidecar.get("outputs", [])):
        from ..export.panoptic_graph import WithPanopticLabels
        from ..panoptic.postprocess import PostprocessConfig

        post = read_card(artifact).extra.get("postprocess_in_graph")
        m = WithPanopticLabels(m, PostprocessConfig.from_dict(post) if post else None)
    if backend not in ("onnxruntime", "ort", "openvino", "ov"):
        raise InputError(f"--backend must be onnxruntime or openvino for an ONNX artifact, got {backend!r}")
    _verify(artifact, m, pq_data, None, None, backend, precision)
