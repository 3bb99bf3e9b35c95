"""Does bf16 autocast pay for C-RBP training on this CPU? (issue 23's bf16 candidate, measured, not shipped)

The recurrent step is the cost of a training step, so only the step runs under autocast here: its
convolutions in bf16, its output cast back to fp32, so the state, the backward solve's accumulation and
the optimizer stay fp32. Three measurements, each arm taking turns with its fp32 twin in one run:

1. one step of the bundled crbp-pathfinder (batch 32, 64 px) without a graph: eager and torch.compile;
   and one VJP through a recorded step (what the backward solve repeats);
2. a whole `trainer.train_step` at the trainer's defaults with `--compile`, fp32 against bf16 (the
   model's step wrapped, so the forward, the recorded step, its VJPs and the LCP all run in bf16);
3. the gradient test of tests/test_train_fast.py (tiny configs, the trainer's default solvers) against
   the exact implicit gradient in float64: fp32 and bf16 cosines (the issue asks >= 0.999).

    OMP_NUM_THREADS=1 python benchmarks/bf16_training.py --json docs/bf16_training.json
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
import torch.nn.functional as F

from crbp_deploy.models import create_model, get_entry
from crbp_deploy.precision import torch_cpu_support
from crbp_deploy.sources import resolve_model
from crbp_deploy.tasks import TASKS
from crbp_deploy.training import solve
from crbp_deploy.training.compiled import compile_step
from crbp_deploy.training.trainer import TrainConfig, train_step

sys.path.insert(0, str(Path(__file__).parent))
from gradient_check import flat_grad  # noqa: E402
from train_throughput import batches, cpu_name  # noqa: E402

FAST = ("forward_solver", "forward_tol", "backward_solver", "backward_tol")


def bf16_step(step):
    """`step` with its convolutions in bf16 and its output in the state's dtype."""

    def reduced(ctx, h):
        with torch.autocast(h.device.type, dtype=torch.bfloat16):
            return step(ctx, h).to(h.dtype)

    return reduced


def bf16_model(model):
    """A copy of `model` whose step (every use of it in solve()) runs under bf16 autocast."""
    model = copy.deepcopy(model)
    model.step = bf16_step(type(model).step.__get__(model))
    return model


def cpu_seconds(fn) -> float:
    t = time.process_time()
    fn()
    return time.process_time() - t


def step_parts(model, batch: dict, repeats: int) -> dict[str, float]:
    """Median CPU ms of one step (eager, compiled) and one VJP, fp32 and bf16, near the fixed point."""
    model = copy.deepcopy(model).eval()
    x = batch["images"]
    with torch.no_grad():
        ctx = model.encode(x)
        h = model.init_state(ctx)
        for _ in range(10):
            h = model.step(ctx, h)
    fns = {"fp32": model.step, "bf16": bf16_step(model.step)}
    steps = {f"eager_step_{k}": f for k, f in fns.items()}
    steps.update({f"compiled_step_{k}": torch.compile(f, dynamic=True, options={"layout_optimization": False})
                  for k, f in fns.items()})
    prev = h.detach().requires_grad_()
    v = torch.randn_like(h)
    vjps = {f"vjp_{k}": (f(ctx, prev), prev) for k, f in fns.items()}
    times: dict[str, list[float]] = {k: [] for k in [*steps, *vjps]}
    with torch.no_grad():
        for f in steps.values():
            f(ctx, h)  # compile / warm up
    for _ in range(repeats):  # interleaved, so load changes hit every arm alike
        with torch.no_grad():
            for name, f in steps.items():
                times[name].append(cpu_seconds(lambda f=f: f(ctx, h)))
        for name, (last, p) in vjps.items():
            times[name].append(cpu_seconds(lambda last=last, p=p: torch.autograd.grad(last, p, v, retain_graph=True)))
    return {k: round(1000 * statistics.median(t), 2) for k, t in times.items()}


def whole_steps(model, data: list[dict], warmup: int) -> dict[str, dict]:
    """CPU seconds per `train_step` (trainer defaults + --compile), fp32 and bf16 taking turns."""
    task = TASKS["pathfinder"]
    cfg = TrainConfig.from_dict(task="pathfinder", loss="bce", lr=3e-3, batch_size=len(data[0]["images"]),
                                steps=30, compile=True)
    arms = {}
    for name, m in (("fp32", copy.deepcopy(model)), ("bf16", bf16_model(model))):
        m.train()
        arms[name] = {"model": m, "opt": torch.optim.Adam(m.parameters(), lr=cfg.lr),
                      "step": compile_step(m, torch.device("cpu")), "cpu_s": [], "forward_steps": [], "vjps": []}
    for r, batch in enumerate(data):
        for name in (("fp32", "bf16") if r % 2 else ("bf16", "fp32")):
            arm = arms[name]
            t = time.process_time()
            _, sol, _ = train_step(cfg, task, arm["model"], arm["opt"], batch, forward_step=arm["step"])
            if r >= warmup:
                arm["cpu_s"].append(time.process_time() - t)
                arm["forward_steps"].append(float(sol.forward_steps.float().mean()))
                arm["vjps"].append(len(sol.neumann.v_norms) - 1)
        print(f"train step round {r + 1}/{len(data)}", file=sys.stderr)
    batch = len(data[0]["images"])
    return {name: {"median_batch_cpu_s": round(statistics.median(a["cpu_s"]), 3),
                   "images_per_cpu_s": round(batch / statistics.median(a["cpu_s"]), 2),
                   "mean_forward_steps": round(statistics.mean(a["forward_steps"]), 2),
                   "mean_vjps": round(statistics.mean(a["vjps"]), 2)} for name, a in arms.items()}


def _gradient(model, x, **kw):
    sol = solve(model, x, grad="rbp", **kw)
    target = torch.linspace(-1, 1, x.shape[-1] ** 2, dtype=x.dtype).view(x.shape[-2:])
    return flat_grad(model, sum(((v - target) ** 2).mean() for v in sol.outputs.values())).double()


def gradient_cosines() -> dict[str, dict]:
    """The trainer's default solvers in fp32 and bf16 against the exact float64 implicit gradient."""
    fast = {k: getattr(TrainConfig(), k) for k in FAST}
    out = {}
    for name in ("hgru-pathfinder", "hgru-panoptic"):
        torch.manual_seed(0)
        exact_model = create_model(name, get_entry(name).tiny).double().train()
        x = torch.rand(3, 3, 24, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        x = x[:, : exact_model.in_channels]
        exact = _gradient(exact_model, x, steps=400, forward_tol=1e-9, neumann_steps=400, neumann_floor=0.0)
        fp32 = copy.deepcopy(exact_model).float()
        out[name] = {k: round(float(F.cosine_similarity(_gradient(m, x.float(), steps=30, neumann_steps=15, **fast),
                                                        exact, dim=0)), 6)
                     for k, m in (("fp32", fp32), ("bf16", bf16_model(fp32)))}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=15, help="Interleaved repeats of each step / VJP.")
    p.add_argument("--rounds", type=int, default=8, help="Timed train steps per arm.")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    model, weights = resolve_model("crbp-pathfinder")
    data = batches(args.rounds + 1, 32, seed=7)
    report = {
        "command": "OMP_NUM_THREADS=1 python benchmarks/bf16_training.py " + " ".join(argv or sys.argv[1:]),
        "cpu": cpu_name(), "torch": torch.__version__, "weights": weights,
        "bf16_native": torch_cpu_support("bf16") is None, "bf16_missing": torch_cpu_support("bf16"),
        "step_ms": step_parts(model, data[0], args.repeats),
        "train_step": whole_steps(model, data, warmup=1),
        "gradient_cosine_vs_exact": gradient_cosines(),
    }
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
