"""`crbp-deploy bench`: one table of backend x strategy x (size, quality, iterations, latency, throughput)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ..errors import CrbpError


def bench(
    model: Optional[str] = typer.Argument(None, help="Checkpoint or bundled model (default: the bundled model)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Held-out data: a COCO panoptic split (PQ) or, for a Pathfinder model, a `data pathfinder` folder (IoU); default: generated (Pathfinder: lengths 6-25 mixed)."),
    threads: int = typer.Option(2, "--threads", help="Threads for every backend."),
    repeats: int = typer.Option(10, "--repeats", help="Timed runs per latency (after one warm-up)."),
    limit: int = typer.Option(48, "--limit", help="Images scored for quality."),
    min_metric: Optional[float] = typer.Option(None, "--min-metric", help="Fail (exit 1) if any row's quality (PQ, or IoU x 100) is below this."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the result as JSON."),
    csv_out: Optional[Path] = typer.Option(None, "--csv", help="Also write the table as CSV."),
    compiled: bool = typer.Option(False, "--compiled", help="Also a torch.compile row (compiling takes about a minute on 2 cores)."),
) -> None:
    """One table: backend x strategy x precision x (MB, PQ or IoU, iterations, residual, latency p50/p90 at batch 1 and 8,
    images/s, GFLOP/s and the fraction of the matmul peak measured at start)."""
    from rich.console import Console
    from rich.table import Table

    from ..bench import run_bench, to_csv
    from ..sources import resolve_model

    if limit < 1:
        raise CrbpError(f"--limit must be >= 1 (images scored and timed), got {limit}")
    m, source = resolve_model(model)
    console = Console(stderr=True)
    result = run_bench(m, data=data, threads=threads, repeats=repeats, limit=limit, progress=lambda s: console.log(s),
                       compiled=compiled)
    result["model"] = source
    table = Table(title=f"crbp-deploy bench: {source} ({threads} threads)")
    metric = result["metric"] + (" x 100" if result["metric"] == "IoU" else "")
    for col in ("backend", "strategy", "precision", "budget", "MB", metric, "mean it.", "residual", "p50 b1", "p90 b1",
                "p50 b8", "p90 b8", "img/s b8", "GFLOP/s b1", "GFLOP/s b8", "of peak b8"):
        table.add_column(col, justify="left" if col in ("backend", "strategy", "precision", "budget") else "right")
    for r in result["rows"]:
        table.add_row(*(str(v) for v in r.values()))
    Console(width=200).print(table)
    typer.echo(json.dumps({"ratios": result["ratios"], "goals_met": result["goals_met"], "peak_gflops": result["peak_gflops"],
                           "gflop_per_step": result["gflop_per_step"], "best_at_equal_quality": result["best_at_equal_quality"],
                           "compute_bound": result["compute_bound"]}, indent=2))
    if json_out:
        json_out.write_text(json.dumps(result, indent=2))
    if csv_out:
        csv_out.write_text(to_csv(result))
    if min_metric is not None:
        low = [r for r in result["rows"] if r["quality"] < min_metric]
        if low:
            raise CrbpError(f"--min-metric {min_metric}: {result['metric']} below it for " + ", ".join(f"{r['backend']}/{r['strategy']} ({r['quality']})" for r in low))
