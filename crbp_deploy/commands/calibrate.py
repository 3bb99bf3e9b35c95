"""`crbp-deploy calibrate`: the quality-vs-steps frontier of every halting policy on held-out data, the
per-image oracle, the chosen budget written into the card."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def calibrate(
    model: str = typer.Argument(..., help="Checkpoint file, bundled model or registered architecture."),
    data: Optional[Path] = typer.Option(None, "--data", help="Held-out data: a COCO panoptic folder (panoptic models) or a "
                                        "`crbp-deploy data pathfinder` folder (Pathfinder models), or a root with SPLIT/ "
                                        "(default: generated at the card's image size, --limit images or 96)."),
    split: str = typer.Option("val", "--split", help="Subfolder used when --data is a dataset root."),
    max_drop: float = typer.Option(0.5, "--max-drop", help="Quality points (PQ, or IoU x 100) the chosen tolerance may lose against the best of the sweep."),
    fixed: Optional[str] = typer.Option(None, "--fixed", help="Fixed counts listed in the table, e.g. 1,2,5,10,20 (every count up to the cap is swept)."),
    tols: Optional[str] = typer.Option(None, "--tols", help="Tolerances of the tol policy, e.g. 0.1,0.01,0.001 (default: 0.1 .. 0.0003)."),
    policies: str = typer.Option("tol,estimate,stable,learned", "--policies", help="Halting policies to sweep (learned needs a halting head: --fit-head)."),
    fit_head: bool = typer.Option(False, "--fit-head", help="Fit the learned policy's halting head on --head-split first; it is saved with the model."),
    head_split: str = typer.Option("train", "--head-split", help="Split of --data the halting head is fitted on (never the calibration split)."),
    latency: bool = typer.Option(True, "--latency/--no-latency", help="Time the frontier at batch 1 and 8 (PyTorch eager)."),
    max_iters: Optional[int] = typer.Option(None, "--max-iters", help="Early-exit cap (default: the card's, else 4x the training steps)."),
    limit: int = typer.Option(0, "--limit", help="Use the first N images only (0 = all)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the calibrated checkpoint here (default: update the checkpoint file in place; a bundled model needs --out)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Report only; write no checkpoint."),
    plot_path: Optional[Path] = typer.Option(None, "--plot", help="Also write quality vs mean iterations as a PNG."),
    as_json: bool = typer.Option(False, "--json", help="Print the calibration as JSON."),
) -> None:
    """Sweep fixed counts and halting policies, print the frontier and the oracle, record the chosen budget in the card."""
    from rich.console import Console

    from .. import checkpoint
    from .. import calibrate as cal
    from ..errors import InputError
    from ..sources import resolve_model

    fixed_counts = cal.parse_list(fixed, int, "--fixed")
    tolerances = cal.parse_list(tols, float, "--tols")
    cal.check_options(max_drop, fixed_counts or cal.FIXED_COUNTS, cal.TOLERANCES if tolerances is None else tolerances,
                      max_iters)
    names = cal.check_policies([p.strip() for p in policies.split(",") if p.strip()])
    if fit_head and "learned" not in names:
        raise InputError("--fit-head fits the learned policy's head: include learned in --policies")
    if fit_head and head_split == split:
        raise InputError(f"--head-split {head_split} is the calibration split: fit the head on other images")
    if fit_head and data is None:
        raise InputError("--fit-head needs --data with a training split (generated held-out data has none)")
    m, source = resolve_model(model)
    if data is None:
        import tempfile

        tmp = tempfile.TemporaryDirectory(prefix="crbp-calibrate-")
        data = cal.held_out(m, Path(tmp.name) / "held-out", limit or cal.HELD_OUT_IMAGES)
        if not as_json:
            Console(stderr=True).print(f"no --data: calibrating on {limit or cal.HELD_OUT_IMAGES} generated held-out "
                                       f"images at the card's image size")
    dest = None if dry_run else cal.check_destination(out, source)
    log = Console(stderr=True)
    result = cal.calibrate(m, data, max_drop=max_drop, fixed=fixed_counts, tols=tolerances, max_iters=max_iters,
                           split=split, limit=limit, policies=["tol", *names], fit_head=fit_head, head_split=head_split,
                           latency=latency, progress=None if as_json else log.print)
    result["model"] = source
    if plot_path is not None:
        cal.plot(result, plot_path)
    if dest is not None:
        checkpoint.save(m, dest, meta=cal.card_meta(getattr(m, "meta", None), result))
    if as_json:
        typer.echo(json.dumps({**result, "written": str(dest) if dest else None}, indent=2))
        return
    console = Console(width=160)
    console.print(cal.format_table(result, title=f"calibrate {source} on {data} ({result['images']} images)"))
    for line in cal.summary_lines(result):
        console.print(line)
    if dest is not None:
        console.print(f"wrote the budget and the sweep into the card of {dest}")
    elif not dry_run:
        console.print(f"{source} is not a checkpoint file: nothing written (pass --out FILE to save a calibrated copy)")
