"""The issue-11 comparison: C-RBP vs BPTT (memory-matched) vs a feed-forward twin of equal parameters, PQ vs
test-time steps, 64 -> 128 size generalisation, training memory; installs the bundled models.

    python benchmarks/panoptic_report.py --model runs/gpu/crbp/epoch20.pt --bptt runs/cpu/bptt/epoch20.pt \
        --baseline runs/cpu/ff/epoch20.pt --data data/pan128 --size-data data/pan64 \
        --old-model runs/old-crbp-panoptic.pt --memory runs/gpu_run1/summary.json --install

Writes docs/panoptic.md, docs/panoptic.json, docs/panoptic_pq_vs_steps.png, docs/panoptic_predictions.png and, with
--install, crbp_deploy/zoo/crbp-panoptic.pt and ff-panoptic.pt (+ .md model cards); the C-RBP card holds the
chosen inference budget and the data it was trained on.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from crbp_deploy import checkpoint  # noqa: E402
from crbp_deploy.calibrate import Point, choose  # noqa: E402
from crbp_deploy.tasks import PANOPTIC  # noqa: E402
from crbp_deploy.panoptic.postprocess import PostprocessConfig  # noqa: E402
from crbp_deploy.panoptic.predict import PanopticPredictor, segment_colors  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Segments under 96 px are void: chosen on 60 separate scenes (`crbp-deploy data panoptic --out runs/pan128_tune
# --count 60 --size 128 --val-fraction 1.0 --seed 7`), where the bundled model's PQ things at min_area 16 / 32 / 64 /
# 96 / 128 was 58.43 / 60.20 / 61.71 / 62.52 / 62.62 (bandwidth 1.0 / 2.0 at 32: 50.21 / 56.72). The same
# post-processing is applied to every compared model.
POSTPROCESS = {"min_area": 96}
POSTPROCESS_NOTE = ("min_area 96, chosen on 60 separate scenes (seed 7) among 16 / 32 / 64 / 96 / 128 (PQ things of "
                    "the C-RBP model 58.43 / 60.20 / 61.71 / 62.52 / 62.62); the same for every model")
TOLS = [3e-2, 1e-2, 3e-3]
PQ_SLACK = 0.3  # the deployed tolerance is the loosest whose PQ is within this of the sweep's best
DATA_COMMAND = "crbp-deploy data panoptic --out data/pan128 --count 3200 --size 128 --val-fraction 0.0625 --seed 0"
MODEL_CONFIG = '{"grouping": "embedding", "channels": 32, "encoder_channels": 32, "head_channels": 32, "kernel_size": 5, "downsample": 1}'
FF_CONFIG = '{"grouping": "embedding", "channels": 32, "encoder_channels": 32, "head_channels": 36, "kernel_size": 5, "downsample": 1, "ff_depth": 2}'
COMMON = "--task panoptic --data data/pan128 --batch-size 32 --lr 1e-3 --seed 0 --keep-epochs --report-every 0"
# How the three compared models were trained: same data, batch, optimiser, seed; compared at epoch 20.
TRAIN_COMMANDS = f"""{DATA_COMMAND}
# C-RBP, on one H200 (about 10 s an epoch); run with --epochs 400 and stopped by a time limit after epoch 20,
# which trains exactly as --epochs 20 (constant learning rate, per-epoch seeded order)
crbp-deploy train {COMMON} --epochs 20 --device cuda --out runs/gpu/crbp --model hgru-panoptic \\
    --model-config '{MODEL_CONFIG}' --grad crbp --steps 30 --forward-tol 0.01
# BPTT at 2 steps: the most that fits C-RBP's training memory (benchmarks/panoptic_gpu_train.py measured it), on CPU
crbp-deploy train {COMMON} --epochs 20 --threads 1 --out runs/cpu/bptt --model hgru-panoptic \\
    --model-config '{MODEL_CONFIG}' --grad bptt --steps 2
# the feed-forward twin (84,008 vs 83,852 parameters), on CPU
crbp-deploy train {COMMON} --epochs 20 --threads 1 --out runs/cpu/ff --model ff-panoptic \\
    --model-config '{FF_CONFIG}' --grad bptt --steps 1"""


def summary(result: dict) -> dict:
    return {
        "pq": result["pq"], "sq": result["sq"], "rq": result["rq"],
        "iterations": result["iterations"],
        "per_class": {str(k): {m: v[m] for m in ("pq", "sq", "rq")} for k, v in result["per_class"].items()},
    }


LIMIT = 0  # --limit: evaluate on the first N val images only (quick checks)


CACHE: dict = {}  # --cache: results by (model file, data, budget), so a report can be re-run as runs finish
CACHE_FILE: Path | None = None


def run(predictor, dataset, **budget) -> dict:
    key = json.dumps([predictor.source, str(dataset.images_dir), LIMIT, budget, predictor.post.to_dict()], sort_keys=True)
    if key in CACHE:
        return CACHE[key]
    t0 = time.perf_counter()
    res = summary(PANOPTIC.evaluate(predictor, dataset, batch_size=50, limit=LIMIT, **budget))
    res["seconds"] = round(time.perf_counter() - t0, 2)
    print(json.dumps({"budget": budget, "pq": res["pq"]["all"], "iters": res["iterations"]["mean"]}), flush=True)
    CACHE[key] = res
    if CACHE_FILE:
        CACHE_FILE.write_text(json.dumps(CACHE))
    return res


def _predictor(path: Path, post: PostprocessConfig, **kwargs):
    model = checkpoint.load(path)
    predictor = PanopticPredictor.from_model(model, postprocess_config=post, **kwargs)
    predictor.source = str(path.resolve())
    return model, predictor


def picture(predictor, dataset, path: Path, count: int = 6) -> None:
    cats = predictor.categories
    fig, axes = plt.subplots(3, count, figsize=(2.2 * count, 6.8))
    items = [dataset.load(i) for i in range(count)]
    preds = predictor.predict([rgb.astype(np.float32) / 255 for rgb, _, _ in items])
    for j, ((rgb, ids, segs), pred) in enumerate(zip(items, preds)):
        axes[0, j].imshow(rgb)
        axes[1, j].imshow(segment_colors(ids, [{**s, "isthing": s.get("isthing")} for s in segs], cats))
        axes[2, j].imshow(segment_colors(pred.pan_ids, pred.segments_info, cats))
        axes[2, j].set_xlabel(f"{pred.iterations} it.", fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([]), ax.set_yticks([])
    for row, label in enumerate(("image", "ground truth", "C-RBP prediction")):
        axes[row, 0].set_ylabel(label)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _other(path: Path | None, dataset, post, **budget) -> dict | None:
    """A compared model: its parameters, training record and PQ at the given budget."""
    if path is None:
        return None
    model, predictor = _predictor(path, post)
    return {"path": str(path), "parameters": model.num_parameters(), "training": model.meta.get("training", {}),
            "budget": budget, "result": run(predictor, dataset, **budget)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="the C-RBP checkpoint")
    ap.add_argument("--baseline", type=Path, help="the feed-forward twin")
    ap.add_argument("--bptt", type=Path, help="the memory-matched BPTT model")
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--size-data", type=Path, help="a 64 px split for the size-generalisation rows")
    ap.add_argument("--old-model", type=Path, help="the previously bundled model (trained at 64 px)")
    ap.add_argument("--memory", type=Path, help="summary.json of benchmarks/panoptic_gpu_train.py (training memory)")
    ap.add_argument("--steps", default="1,2,3,5,8,10,15,20,30,45,60,90,120")
    ap.add_argument("--docs", type=Path, default=ROOT / "docs")
    ap.add_argument("--install", action="store_true", help="copy the models into crbp_deploy/zoo with their cards")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--limit", type=int, default=0, help="first N val images only (quick checks)")
    ap.add_argument("--render-only", action="store_true", help="rewrite panoptic.md from an existing panoptic.json")
    ap.add_argument("--cache", type=Path, help="JSON file of evaluation results to reuse and extend")
    args = ap.parse_args()
    if args.render_only:
        report = json.loads((args.docs / "panoptic.json").read_text())
        write_markdown(report, args.docs / "panoptic.md")
        plot(report, args.docs / "panoptic_pq_vs_steps.png")
        return
    global LIMIT, CACHE_FILE
    LIMIT = args.limit
    if args.cache:
        CACHE_FILE = args.cache
        CACHE.update(json.loads(args.cache.read_text()) if args.cache.exists() else {})
    torch.set_num_threads(args.threads)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)

    post = PostprocessConfig.from_dict(POSTPROCESS)
    small_post = PostprocessConfig.from_dict({"min_area": POSTPROCESS["min_area"] // 4})  # 64 px: a quarter of the area
    model, predictor = _predictor(args.model, post)
    dataset = PANOPTIC.open(args.data, "val")
    train_steps = model.meta["training"]["steps"]
    cap = 4 * train_steps

    fixed = {int(s): run(predictor, dataset, iters=int(s)) for s in args.steps.split(",")}
    early = {str(t): run(predictor, dataset, max_iters=cap, tol=t) for t in TOLS}
    # one rule with `crbp-deploy calibrate`: the loosest tol within PQ_SLACK of the sweep's best PQ, and the
    # smallest fixed count within PQ_SLACK of that (what early exit has to beat on speed)
    points = [Point({"iters": s}, r["pq"]["all"], r["iterations"]["mean"]) for s, r in fixed.items()]
    points += [Point({"max_iters": cap, "tol": float(t)}, r["pq"]["all"], r["iterations"]["mean"]) for t, r in early.items()]
    choice = choose(points, PQ_SLACK)
    budget = choice["budget"]
    rule = (f"the loosest tolerance whose PQ is within {PQ_SLACK} of the best PQ of the sweep (the rule of "
            "`crbp-deploy calibrate`)")
    if "tol" not in budget:  # the card holds an early-exit budget; keep the best tolerance of the sweep
        budget = {"max_iters": cap, "tol": max(TOLS, key=lambda t: early[str(t)]["pq"]["all"])}
        rule = (f"the sweep's best PQ was a fixed count ({choice['budget']}); the card keeps early exit at the "
                "tolerance with the best PQ")
    at_budget = early[str(budget["tol"])]

    bptt_steps = checkpoint.load(args.bptt).meta["training"]["steps"] if args.bptt else None
    size = {}
    if args.size_data:
        small = PANOPTIC.open(args.size_data, "val")
        size["crbp_64"] = run(_predictor(args.model, small_post)[1], small, **budget)
    if args.old_model:
        old, old_predictor = _predictor(args.old_model, post)
        old_budget = old.meta.get("inference", {}).get("budget", {"max_iters": 80, "tol": 0.03})
        size["old_128"] = run(old_predictor, dataset, **old_budget)
        if args.size_data:
            size["old_64"] = run(_predictor(args.old_model, small_post)[1], small, **old_budget)
    report = {
        "command": command,
        "model": str(args.model),
        "parameters": model.num_parameters(),
        "training": model.meta["training"],
        "data": {"folder": str(args.data), "val_images": len(dataset) if not LIMIT else LIMIT, "command": DATA_COMMAND},
        "postprocess": POSTPROCESS,
        "postprocess_note": POSTPROCESS_NOTE,
        "fixed_steps": {str(k): v for k, v in fixed.items()},
        "early_exit": early,
        "chosen_budget": budget,
        "budget_rule": rule,
        "pq_at_budget": at_budget["pq"],
        "fixed_count_matching_early_exit": (choice.get("fixed_baseline") or {}).get("iters"),
        "baseline": _other(args.baseline, dataset, post, iters=1),
        "bptt": _other(args.bptt, dataset, post, iters=bptt_steps) if args.bptt else None,
        "bptt_at_crbp_budget": _other(args.bptt, dataset, post, **budget) if args.bptt else None,
        "size_generalisation": size,
        "memory": json.loads(args.memory.read_text()) if args.memory else None,
        "contraction_report": model.meta.get("contraction_report") or _contraction(model),
    }
    args.docs.mkdir(parents=True, exist_ok=True)
    (args.docs / "panoptic.json").write_text(json.dumps(report, indent=2))
    plot(report, args.docs / "panoptic_pq_vs_steps.png")
    _, deployed = _predictor(args.model, post, budget=budget)
    picture(deployed, dataset, args.docs / "panoptic_predictions.png")
    write_markdown(report, args.docs / "panoptic.md")
    if args.install:
        install(model, report, args.model)
        if args.baseline:
            install_baseline(checkpoint.load(args.baseline), report)


def plot(report: dict, path: Path) -> None:
    fixed = {int(k): v for k, v in report["fixed_steps"].items()}
    train_steps = report["training"]["steps"]
    fig, ax = plt.subplots(figsize=(6.6, 4.4))
    xs = sorted(fixed)
    for group, style in (("all", "-o"), ("things", "--s")):
        ax.plot(xs, [fixed[s]["pq"][group] for s in xs], style, label=f"C-RBP, fixed steps (PQ {group})", ms=4)
    for k, (t, r) in enumerate(report["early_exit"].items()):
        ax.scatter([r["iterations"]["mean"]], [r["pq"]["all"]], marker="*", s=120, zorder=5)
        ax.annotate(f"tol={float(t):g}", (r["iterations"]["mean"], r["pq"]["all"]), fontsize=7,
                    xytext=(-8, 10 if k % 2 else -16), textcoords="offset points")
    for key, color, label in (("baseline", "gray", "feed-forward twin"), ("bptt", "tab:red", "BPTT (memory-matched)")):
        if report.get(key):
            r = report[key]["result"]["pq"]
            ax.axhline(r["all"], color=color, ls="--", lw=1, label=f"{label} (PQ all)")
            ax.axhline(r["things"], color=color, ls=":", lw=1, label=f"{label} (PQ things)")
    ax.axvline(train_steps, color="k", lw=0.8, alpha=0.5, label="training horizon")
    ax.set_xscale("log")
    ax.set_xlabel("test-time steps (stars: early exit, at its mean iterations)")
    ax.set_ylabel("PQ (%)")
    ax.set_title("hgru-panoptic (C-RBP), 128 px held-out split")
    ax.legend(fontsize=6.5, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _row(name: str, r: dict, params: int | None = None) -> str:
    pq, sq, rq = r["pq"], r["sq"], r["rq"]
    f = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    curve = r["per_class"].get("1", {}).get("pq")
    return (f"| {name} | {f(pq['all'])} | {f(pq['things'])} | {f(curve)} | {f(pq['stuff'])} | {f(sq['all'])} "
            f"| {f(rq['all'])} | {r['iterations']['mean']:.1f} |")


def _mb(report: dict, key: str) -> str:
    mem = (report.get("memory") or {}).get("memory_bytes", {})
    return f"{mem[key] / 2**20:,.0f} MiB" if key in mem else "not measured"


def _contraction(model) -> dict:
    """The trainer's contraction report (4 training scenes), for a run stopped before its last epoch wrote one."""
    from crbp_deploy.contraction import contraction_report
    from crbp_deploy.data.coco_panoptic import PanopticDataset

    train = PanopticDataset.from_split(model.meta["training"]["data"], "train", targets=False)
    return contraction_report(model, torch.stack([train[i]["image"] for i in range(4)]))


def _discussion(report: dict) -> list[str]:
    ours = report["early_exit"][str(report["chosen_budget"]["tol"])]
    pc = lambda r, c: r["per_class"].get(c, {}).get("pq", float("nan"))  # noqa: E731
    lines = ["", "What this shows:", ""]
    for key, label in (("baseline", "the feed-forward twin"), ("bptt", "memory-matched BPTT")):
        if report.get(key):
            r = report[key]["result"]
            lines.append(
                f"- C-RBP vs {label}: PQ {ours['pq']['all']:.2f} vs {r['pq']['all']:.2f}, PQ things "
                f"{ours['pq']['things']:.2f} vs {r['pq']['things']:.2f} ({ours['pq']['things'] - r['pq']['things']:+.2f}). "
                f"By class: blobs {pc(ours, '3'):.1f} vs {pc(r, '3'):.1f}, curves {pc(ours, '1'):.1f} vs {pc(r, '1'):.1f}.")
    lines.append(
        "- The gain is on blobs (ellipses up to 17 px in radius: a pixel's embedding must agree with pixels far "
        "beyond two 5x5 layers at stride 2, which the recurrence reaches and the twin does not). Crossing curves "
        "are *not* told apart better: PQ curves is about 28-31 for all three models; tangles of many same-coloured "
        "curves still merge or split (docs/panoptic_predictions.png).")
    it = ours["iterations"]
    radius = report["contraction_report"]["spectral_radius"]
    above = sum(r > 1 for r in radius)
    lines.append(
        f"- Early exit at the card's budget: {it['mean']:.1f} mean iterations, {100 * it['converged_fraction']:.0f}% of "
        f"the scenes converge within the cap of {report['chosen_budget']['max_iters']}; the rest (dense tangles) run "
        f"to the cap. The contraction report in the card ({len(radius)} training scenes) shows why: spectral radius "
        f"{min(radius):.2f}-{max(radius):.2f}, {above} scene(s) above 1 — the mean-reduced LCP lets a minority of "
        "inputs escape contraction. PQ stays stable past the horizon all the same (table below).")
    return lines


def write_markdown(report: dict, path: Path) -> None:
    tr = report["training"]
    ours = report["pq_at_budget"]
    fixed = {int(k): v for k, v in report["fixed_steps"].items()}
    horizon, longest = tr["steps"], max(fixed)
    cols = "| run | PQ | PQ things | PQ curves | PQ stuff | SQ | RQ | mean iterations |\n|---|---|---|---|---|---|---|---|"
    lines = [
        "# Panoptic: C-RBP vs BPTT vs a feed-forward twin (128 px)",
        "",
        f"Trained with (commands as run; the comparison is at epoch {tr['epochs_done']} for all three):\n\n```bash\n{TRAIN_COMMANDS}\n```\n",
        f"Evaluated (this page, its plots and the bundled models' cards) by:\n\n```bash\n{report['command']}\n```\n",
        f"C-RBP model `hgru-panoptic` ({report['parameters']:,} parameters, embedding grouping), `grad={tr['grad']}`, "
        f"{tr['steps']} steps with the forward run per sample to relative change {tr.get('forward_tol')}, "
        f"{tr['neumann_steps']} Neumann terms ({tr['neumann_rule']} rule), LCP lambda {tr['lcp_lambda']} "
        f"(weight {tr['penalty_weight']}, reduction {tr['lcp_reduction']}), batch {tr['batch_size']}, Adam lr {tr['lr']}, "
        f"seed {tr['seed']}. Held-out split: {report['data']['val_images']} generated 128x128 scenes "
        f"(`{report['data']['command']}`, val), panopticapi rules, post-processing {report['postprocess']} "
        f"({report.get('postprocess_note', '')}).",
        "",
        "## The three models",
        "",
        cols,
    ]
    lines.append(_row(f"C-RBP at its deployed budget {report['chosen_budget']}", report["early_exit"][str(report["chosen_budget"]["tol"])]))
    if report.get("bptt"):
        b = report["bptt"]
        lines.append(_row(f"BPTT, {b['budget']['iters']} steps (trained and tested)", b["result"]))
        lines.append(_row(f"BPTT model at C-RBP's budget", report["bptt_at_crbp_budget"]["result"]))
    if report.get("baseline"):
        b = report["baseline"]
        lines.append(_row(f"feed-forward twin ({b['parameters']:,} parameters)", b["result"]))
    lines += ["", "Training memory (peak CUDA memory of one training step, batch 32, 128 px; "
              "`benchmarks/panoptic_gpu_train.py`): "
              f"C-RBP ({horizon} steps) {_mb(report, 'crbp')}; BPTT 1 step {_mb(report, 'bptt1')}, 2 steps "
              f"{_mb(report, 'bptt2')}, 3 steps {_mb(report, 'bptt3')} — so BPTT gets 2 steps within C-RBP's memory. "
              "The feed-forward twin's memory was not measured."]
    lines += _discussion(report)
    lines += ["", "## PQ vs test-time steps (C-RBP)", "", cols]
    for s, r in report["fixed_steps"].items():
        lines.append(_row(f"{s} fixed steps", r))
    for t, r in report["early_exit"].items():
        lines.append(_row(f"early exit tol={t} (cap {report['chosen_budget']['max_iters']})", r))
    lines += ["", f"Stable past the horizon: PQ {fixed[horizon]['pq']['all']:.2f} at the {horizon} training steps, "
              f"{fixed[longest]['pq']['all']:.2f} at {longest} ({longest // horizon}x); cut short, "
              f"{fixed[min(fixed)]['pq']['all']:.2f} at {min(fixed)} step."]
    size = report.get("size_generalisation") or {}
    if size:
        lines += ["", "## Size: 64 px and 128 px", "", cols]
        names = {"crbp_64": "new C-RBP (trained at 128) on 64 px scenes", "old_128": "previous bundled model (trained at 64) on 128 px",
                 "old_64": "previous bundled model on 64 px"}
        for key, r in size.items():
            lines.append(_row(names[key], r))
    lines += [
        "",
        f"Deployed budget (in the model card): `{report['chosen_budget']}` — {report['budget_rule']}.",
        "",
        "![PQ vs steps](panoptic_pq_vs_steps.png)",
        "",
        "![predictions](panoptic_predictions.png)",
        "",
    ]
    path.write_text("\n".join(lines))


def _card(model, meta: dict, name: str, summary: str, report: dict) -> None:
    from crbp_deploy import zoo

    meta.pop("history", None)
    dest = Path(zoo.__file__).parent / f"{name}.pt"
    checkpoint.save(model, dest, meta=meta)
    card = [f"# {name}", "", summary, "", f"Data: `{DATA_COMMAND}` (train split, 3,000 scenes of 128x128).", "",
            f"Produced by `{report['command']}`; details in docs/panoptic.md."]
    dest.with_suffix(".md").write_text("\n".join(card) + "\n")
    print(f"installed {dest} ({dest.stat().st_size / 1e6:.2f} MB)")


def install(model, report: dict, source: Path) -> None:
    from crbp_deploy import zoo

    meta = dict(model.meta)
    meta["inference"] = {"budget": report["chosen_budget"], "postprocess": report["postprocess"]}
    meta["data"] = {**meta.get("data", {}), "command": DATA_COMMAND}
    meta["contraction_report"] = report["contraction_report"]
    meta["evaluation"] = {
        "split": "val (held out)", "data": report["data"], "pq_at_budget": report["pq_at_budget"], "image_size": 128,
        "pq_vs_steps": {s: r["pq"]["all"] for s, r in report["fixed_steps"].items()}, "command": report["command"],
    }
    pq = report["pq_at_budget"]
    summary = (f"`hgru-panoptic` with embedding grouping, {model.num_parameters():,} parameters, trained from `{source}` "
               f"with C-RBP ({meta['training']['steps']} steps, {meta['training']['epochs_done']} epochs). Calibrated "
               f"inference budget: {report['chosen_budget']}. PQ on the held-out 128 px split at that budget: "
               f"{pq['all']:.2f} (things {pq['things']:.2f}, stuff {pq['stuff']:.2f}).\n\nPQ vs fixed test-time steps: "
               + ", ".join(f"{s}: {v:.2f}" for s, v in meta["evaluation"]["pq_vs_steps"].items()))
    _card(model, meta, zoo.DEFAULT, summary, report)


def install_baseline(model, report: dict) -> None:
    meta = dict(model.meta)
    meta["inference"] = {"budget": {"iters": 1}, "postprocess": report["postprocess"]}
    meta["evaluation"] = {"split": "val (held out)", "data": report["data"], "image_size": 128,
                          "pq": report["baseline"]["result"]["pq"], "command": report["command"]}
    meta["data"] = {**meta.get("data", {}), "command": DATA_COMMAND}
    pq = report["baseline"]["result"]["pq"]
    summary = (f"`ff-panoptic`, the feed-forward twin of crbp-panoptic ({model.num_parameters():,} parameters): the "
               f"recurrence replaced by stacked convolutions; same data, epochs, batch and optimiser. PQ on the held-out "
               f"128 px split: {pq['all']:.2f} (things {pq['things']:.2f}, stuff {pq['stuff']:.2f}). Re-run the comparison: "
               "`crbp-deploy eval ff-panoptic --data data/pan128` next to `crbp-deploy eval crbp-panoptic --data data/pan128`.")
    _card(model, meta, "ff-panoptic", summary, report)


if __name__ == "__main__":
    main()
