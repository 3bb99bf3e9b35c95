"""What a correct gradient costs: CPU seconds of one training batch at given forward / backward budgets, cold and warm.

    OMP_NUM_THREADS=1 python benchmarks/budget_cost.py --model runs/p25/c/epoch23.pt \
        --previous runs/p25/c/epoch22.pt --lengths 14,20,25 --budgets 40/15,120/60

Each budget is `--steps`/`--neumann-steps` of `crbp-deploy train` (the rest: the trainer's defaults, BCE, the
spectral LCP on every sample, weight 10). Each runs cold (forward from zeros) and warm (`--warm-start`: from
the fixed points the `--previous` weights reach under the same budget, as the trainer's cache holds after an
epoch). All arms train `--model`'s weights on the same batches, taking turns, weights set back after each
batch; the first round is a warm-up. Reported per arm: median CPU seconds (one thread: what a dedicated core
takes), the ratio to the first budget cold, mean forward steps, backward VJPs, and the share of samples that
ran the whole forward budget (`forward_at_cap` of the trainer). docs/pathfinder_claims.md §11.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import batches, reset_weights, warm_cache  # noqa: E402

from crbp_deploy.errors import CrbpError  # noqa: E402
from crbp_deploy.sources import resolve_model  # noqa: E402
from crbp_deploy.tasks import TASKS  # noqa: E402
from crbp_deploy.training.trainer import TrainConfig, share_at_cap, train_step  # noqa: E402


def parse_budgets(text: str) -> list[tuple[int, int]]:
    try:
        return [(int(a), int(b)) for a, b in (item.split("/") for item in text.split(","))]
    except ValueError:
        raise SystemExit(f"error: --budgets {text!r}: expected STEPS/VJPS[,STEPS/VJPS...], e.g. 40/15,120/60")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint whose weights every arm trains")
    p.add_argument("--previous", required=True, help="checkpoint of the epoch before: the warm arms' caches")
    p.add_argument("--lengths", default="14,20,25")
    p.add_argument("--budgets", default="40/15,120/60", help="STEPS/VJPS per arm, comma-separated")
    p.add_argument("--rounds", type=int, default=4, help="batches per arm; the first is a warm-up")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    budgets = parse_budgets(args.budgets)
    torch.set_num_threads(1)
    try:
        original, _ = resolve_model(args.model)
    except CrbpError as err:
        raise SystemExit(f"error: --model: {err}")
    task = TASKS["pathfinder"]
    data = batches(args.rounds, args.batch_size, seed=7, lengths=tuple(int(x) for x in args.lengths.split(",")))
    arms = {}
    for steps, vjps in budgets:
        cfg = TrainConfig.from_dict(task="pathfinder", loss="bce", lr=3e-4, batch_size=args.batch_size, steps=steps,
                                    neumann_steps=vjps, lcp_kind="spectral", lcp_every=1, penalty_weight=10)
        arms[f"{steps}/{vjps}, cold"] = (cfg, None)
        arms[f"{steps}/{vjps}, warm"] = (cfg, warm_cache(args.previous, data, cfg))
    model = copy.deepcopy(original).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)
    runs = {name: {"cpu_s": [], "forward_steps": [], "vjps": [], "at_cap": []} for name in arms}
    names = list(arms)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            cfg, cache = arms[name]
            index = torch.arange(r * args.batch_size, (r + 1) * args.batch_size)
            start = (lambda cold, c=cache, i=index: c.start(i, cold)) if cache is not None else None
            t = time.process_time()
            _, sol, _ = train_step(cfg, task, model, optimizer, data[r], start_state=start)
            seconds = time.process_time() - t
            reset_weights(model, original)
            if r:
                run = runs[name]
                run["cpu_s"].append(seconds)
                run["forward_steps"].append(float(sol.forward_steps.float().mean()))
                run["vjps"].append(len(sol.neumann.v_norms) - 1)
                run["at_cap"].append(share_at_cap(sol, cfg.steps))
        print(f"round {r + 1}/{args.rounds}", file=sys.stderr)
    base = statistics.median(runs[names[0]]["cpu_s"])
    report = {name: {"median_cpu_s": round(statistics.median(run["cpu_s"]), 2),
                     "x_cost": round(statistics.median(run["cpu_s"]) / base, 2),
                     "forward_steps": round(statistics.mean(run["forward_steps"]), 1),
                     "vjps": round(statistics.mean(run["vjps"]), 1),
                     "forward_at_cap": round(statistics.mean(run["at_cap"]), 3)} for name, run in runs.items()}
    out = {"command": " ".join(["python", "benchmarks/budget_cost.py", *(argv if argv is not None else sys.argv[1:])]),
           "model": args.model, "previous": args.previous, "lengths": args.lengths, "arms": report}
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
