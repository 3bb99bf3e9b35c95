"""docs/adaptive.md: does early exit follow difficulty? A Pathfinder checkpoint on mixed contour lengths.

    OMP_NUM_THREADS=1 python benchmarks/adaptive_report.py --model runs/pf/crbp20/last.pt --data runs/pf/data \
        [--install crbp-pathfinder] [--bench]

1. `crbp_deploy.calibrate`: fixed counts and tolerances on the held-out split, IoU and iterations per
   contour length for each; the loosest tol within --max-drop of the best and its equal-IoU fixed count.
2. The iterations-vs-length and IoU-vs-length plot (docs/adaptive_iterations.png).
3. With --bench: `crbp_deploy.bench.run_bench` on the same split (latency: early exit vs that fixed count).
4. With --install NAME: the calibrated checkpoint becomes the bundled model NAME (zoo) with its card.
Everything goes to docs/adaptive.json; the page quotes it.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def per_length_runs(model, data: str, calibration: dict, tols: list[float], train_steps: int | None,
                    limit: int) -> list[dict]:
    """IoU and iterations per contour length for each tolerance (the plain tol policy at the calibrated cap),
    the chosen budget, the equal-IoU fixed count and the training steps: the calibration sweep keeps only
    overall numbers, so the task's evaluator runs each of these budgets once more."""
    from crbp_deploy.tasks import scorer_for

    scorer = scorer_for(model, data, limit=limit)
    chosen, cap = calibration["budget"], calibration["cap"]
    budgets = [({"tol": tol, "max_iters": cap}, "tol") for tol in tols]
    if all(budget != chosen for budget, _ in budgets):
        budgets.append((dict(chosen), "tol"))
    fixed = {(calibration.get("fixed_baseline") or {}).get("iters"): "equal-IoU fixed count"}
    fixed.setdefault(train_steps, "training steps")
    budgets += [({"iters": n}, what) for n, what in fixed.items() if n]
    runs = []
    for budget, what in budgets:
        result = scorer.evaluate(**budget)
        runs.append({"budget": budget, "what": what, "chosen": budget == chosen, **scorer.details(result)})
    return runs


def plot(calibration: dict, runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted(int(n) for n in runs[0]["per_length"])
    fig, (ax_it, ax_q) = plt.subplots(1, 2, figsize=(10, 4))
    for run in (r for r in runs if r["what"] == "tol"):
        per = run["per_length"]
        b = run["budget"]
        policy = b.get("policy", "tol")
        label = f"tol {b['tol']:g}" if policy == "tol" else f"{policy} {b['threshold']:g} x{b['patience']}"
        label += " (chosen)" if run["chosen"] else ""
        ax_it.plot(lengths, [per[str(n)]["mean_iterations"] for n in lengths], "-o", lw=2.5 if run["chosen"] else 1,
                   ms=4, label=label)
        if run["chosen"]:
            ax_q.plot(lengths, [100 * per[str(n)]["iou"] for n in lengths], "-*", lw=2.5, ms=10, label=f"early exit, {label}")
    for run in (r for r in runs if r["what"] != "tol"):
        per = run["per_length"]
        ax_q.plot(lengths, [100 * per[str(n)]["iou"] for n in lengths], "--o", ms=4,
                  label=f"fixed {run['budget']['iters']} ({run['what']})")
    ax_it.set_xlabel("contour length (paddles)")
    ax_it.set_ylabel("mean iterations to converge")
    ax_it.set_title("early exit: iterations per contour length")
    ax_it.legend(fontsize=7)
    ax_q.set_xlabel("contour length (paddles)")
    ax_q.set_ylabel("IoU x 100")
    ax_q.set_title("IoU per contour length")
    ax_q.legend(fontsize=7)
    for ax in (ax_it, ax_q):
        ax.set_xticks(lengths)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def install(model, name: str, calibration: dict, source: str, command: str) -> Path:
    from crbp_deploy import checkpoint

    zoo = ROOT / "crbp_deploy" / "zoo"
    path = checkpoint.save(model, zoo / f"{name}.pt", meta=model.meta)
    per = calibration["check"]["chosen"]["per_length"]
    table = "\n".join(f"| {n} | {100 * v['iou']:.1f} | {v['mean_iterations']:.2f} |" for n, v in per.items())
    training = model.meta.get("training", {})
    (zoo / f"{name}.md").write_text(
        f"# {name}\n\n`{model.arch}`, {model.num_parameters():,} parameters, from `{source}`, trained with "
        f"{training.get('grad', '?')} ({training.get('steps', '?')} steps) on `{training.get('data', '?')}`; "
        f"evaluated on contour lengths {', '.join(per)}.\n\nInference budget (calibrated): {calibration['budget']} -- "
        f"IoU x 100 {calibration['quality']:.2f} at {calibration['mean_iterations']:.2f} mean iterations; equal-IoU "
        f"fixed count: {calibration['fixed_baseline']}.\n\n| length | IoU x 100 | mean iterations |\n|---|---|---|\n"
        f"{table}\n\nProduced by `{command}`; details in docs/adaptive.md.\n"
    )
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="a Pathfinder root with val/ (mixed lengths) or the split itself")
    ap.add_argument("--fixed", default="1,2,3,5,8,10,12,15,20,25,30,40")
    ap.add_argument("--tols", default="0.1,0.05,0.03,0.02,0.01,0.003,0.001")
    ap.add_argument("--max-iters", type=int, default=None)
    ap.add_argument("--max-drop", type=float, default=0.5)
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--bench", action="store_true", help="also run crbp-deploy bench on the split")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--install", metavar="NAME", help="save the calibrated checkpoint as the bundled model NAME")
    ap.add_argument("--out", default=str(ROOT / "docs" / "adaptive.json"))
    ap.add_argument("--plot", default=str(ROOT / "docs" / "adaptive_iterations.png"))
    args = ap.parse_args(argv)

    import torch

    from crbp_deploy import checkpoint
    from crbp_deploy.calibrate import calibrate, card_meta, summary_lines

    command = "python benchmarks/adaptive_report.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model = checkpoint.load(args.model)
    cal = calibrate(model, args.data, max_drop=args.max_drop, fixed=[int(v) for v in args.fixed.split(",")],
                    tols=[float(v) for v in args.tols.split(",")], max_iters=args.max_iters, limit=args.limit,
                    progress=print)
    for line in summary_lines(cal):
        print(line)
    model.meta = card_meta(model.meta, cal)
    steps = (model.meta.get("training") or {}).get("steps")
    runs = per_length_runs(model, args.data, cal, [float(v) for v in args.tols.split(",")], steps, args.limit)
    report = {"command": command, "model": args.model, "calibration": dict(cal), "per_length": runs}
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    plot(report["calibration"], runs, Path(args.plot))
    if args.bench:
        from crbp_deploy.bench import run_bench, to_markdown
        from crbp_deploy.tasks import PATHFINDER, data_folder

        report["bench"] = run_bench(model, data=data_folder(PATHFINDER, args.data), threads=args.threads,
                                    repeats=20, limit=args.limit or 250, progress=print)
        print(to_markdown(report["bench"]))
        print(json.dumps(report["bench"]["ratios"]))
    if args.install:
        print("installed", install(model, args.install, report["calibration"], args.model, command))
    report["seconds"] = round(time.perf_counter() - started, 1)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print("wrote", args.out, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
