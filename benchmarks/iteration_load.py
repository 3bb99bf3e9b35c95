"""Iteration-level scheduling against request-level batching under open-loop load (issue 19).

Same engine (the `ScheduledService` that the Ray and Triton engines run: PNG decode, budget rules, the
scheduler, post-processing, the COCO JSON reply), same artifact (the bundled crbp-panoptic exported
with its ONNX pieces, stepped on ONNX Runtime with one thread), same slots (8); only the scheduler's
mode differs:

- `request`: a batch of up to 8 waiting requests is admitted when every slot is free and answered when
  its slowest member is done (what TorchServe, Ray Serve and Triton's dynamic batcher do);
- `iteration-all`: requests join the running slots between two solver steps and leave when their halting
  fires; every tick steps every occupied row (processor sharing);
- `iteration`: the same, but a tick steps only the rows with the fewest steps so far (the scheduler's
  default on CPU, where a step costs the same per row whatever the batch).

Scenes: 128 px synthetic scenes, split by their solo iteration count into easy (lowest third) and hard
(highest third); the arrivals draw half from each. Load: first the saturation throughput of request-level
batching (a burst of requests, completed per second), then open-loop Poisson arrivals at 50%, 80% and
100% of it, the same arrival times and scenes for both modes, the modes alternating within each load so
drift in the machine's speed falls on both. Latency runs from a request's planned arrival to its answer
(no coordinated omission); throughput is answers per second from the first arrival to the last answer.
Each (load, mode) runs `--repeats` times (ABBA order); percentiles pool the repeats' requests.

    python benchmarks/iteration_load.py                  # table + docs/iteration_load.json
    python benchmarks/iteration_load.py --quick          # a smoke run (fewer requests)
    python benchmarks/iteration_load.py --step-costs     # ms per solver step for 1, 2, 4, 8 slots
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LOADS = (0.5, 0.8, 1.0)
#: arm -> (scheduler mode, priority): request-level batching, and iteration-level stepping every row
#: (processor sharing) or only the rows with the fewest steps (the default on CPU).
ARMS = {"request": ("request", "all"), "iteration-all": ("iteration", "all"),
        "iteration": ("iteration", "fewest-steps")}
MODES = tuple(ARMS)


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def artifact(path: Path) -> Path:
    """The bundled crbp-panoptic as a loop .onnx with its pieces (exported once, then reused)."""
    if not (path.with_name(path.name + ".pieces") / "pieces.json").is_file():
        from crbp_deploy import checkpoint, zoo
        from crbp_deploy.export import export_onnx
        from crbp_deploy.modelcard import ModelCard

        path.parent.mkdir(parents=True, exist_ok=True)
        model = checkpoint.load(zoo.path("crbp-panoptic"))
        export_onnx(model, path, strategy="loop", pieces=True, source="bundled:crbp-panoptic",
                    **ModelCard.of(model).budget.early().kwargs())
    return path


def png(rgb: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buf, format="PNG")
    return buf.getvalue()


def scenes(service, count: int, seed: int) -> dict[str, list[bytes]]:
    """{"easy", "hard"}: PNG scenes from the lowest and highest third of solo iteration counts."""
    from crbp_deploy.data.panoptic_synth import generate_sample
    from crbp_deploy.serving.service import RawRequest

    images = [png(generate_sample(i, seed=seed, size=128)[0]) for i in range(count)]
    iters = [service.handle([RawRequest({"body": b})])[0].body["iterations"] for b in images]
    order = np.argsort(iters, kind="stable")
    third = count // 3
    easy, hard = [images[i] for i in order[:third]], [images[i] for i in order[-third:]]
    return {"easy": easy, "hard": hard, "iterations": {"easy": sorted(iters)[:third], "hard": sorted(iters)[-third:]}}


def drive(scheduled, jobs: list[tuple[float, str, bytes]]) -> dict:
    """Submit `jobs` (planned arrival offset s, class, PNG) open-loop; latencies per class and throughput."""
    from crbp_deploy.serving.service import RawRequest

    done = threading.Event()
    finished: list = []
    lock = threading.Lock()
    start = time.perf_counter() + 0.05

    def record(planned: float, kind: str, future) -> None:
        now = time.perf_counter()
        with lock:
            finished.append((kind, now - planned, future.result().status, now))
            if len(finished) == len(jobs):
                done.set()

    for offset, kind, data in jobs:
        planned = start + offset
        wait = planned - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        future = scheduled.submit(RawRequest({"body": data}))
        future.add_done_callback(lambda f, p=planned, k=kind: record(p, k, f))
    if not done.wait(600):
        raise RuntimeError(f"only {len(finished)} of {len(jobs)} answered within 600 s")
    failed = [s for _, _, s, _ in finished if s != 200]
    if failed:
        raise RuntimeError(f"{len(failed)} requests were not answered 200: {sorted(set(failed))}")
    out = {"throughput_rps": len(jobs) / (max(t for *_, t in finished) - start)}
    out["latencies"] = {kind: np.array([1000 * lat for k, lat, _, _ in finished if k == kind]) for kind in ("easy", "hard")}
    for kind, ms in out["latencies"].items():
        out[kind] = {"n": int(ms.size), "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}
    return out


def saturation(make, pool: dict, burst: int, rng) -> float:
    """Answers per second of request-level batching given `burst` requests at once (its saturation)."""
    scheduled = make("request")
    try:
        jobs = [(0.0, kind, pool[kind][rng.integers(len(pool[kind]))]) for kind in rng.choice(["easy", "hard"], burst)]
        drive(scheduled, jobs[:8])  # warm-up
        return drive(scheduled, jobs)["throughput_rps"]
    finally:
        scheduled.stop()


def poisson(rate: float, count: int, pool: dict, rng) -> list[tuple[float, str, bytes]]:
    times = np.cumsum(rng.exponential(1.0 / rate, count))
    kinds = rng.choice(["easy", "hard"], count)
    return [(float(t), str(k), pool[k][rng.integers(len(pool[k]))]) for t, k in zip(times, kinds)]


def run(args) -> dict:
    from crbp_deploy.serving.scheduled import ScheduledService, SchedulerConfig
    from crbp_deploy.serving.service import PanopticService, ServiceConfig

    path = artifact(Path(args.artifact))
    # no admission control and the longest deadline: every request runs to its own halting in both modes
    service = PanopticService(path, ServiceConfig(threads=1, admission=False, deadline_ms=600_000))
    rng = np.random.default_rng(args.seed)
    pool = scenes(service, args.scenes, args.seed)

    def make(arm: str):
        mode, priority = ARMS[arm]
        config = SchedulerConfig(mode=mode, priority=priority, slots=args.slots, max_queue=100_000)
        return ScheduledService(service, config).start()

    sat = saturation(make, pool, args.burst, rng)
    rows, runs = [], []
    for load in LOADS:
        jobs = poisson(load * sat, args.requests, pool, rng)
        results: dict[str, list] = {mode: [] for mode in MODES}
        for repeat in range(args.repeats):  # A B, then B A: drift in the machine's speed falls on both
            for mode in (MODES if repeat % 2 == 0 else MODES[::-1]):  # arms in ABC, then CBA order
                scheduled = make(mode)
                try:
                    results[mode].append(drive(scheduled, jobs))
                finally:
                    scheduled.stop()
                r = results[mode][-1]
                runs.append({"load": load, "mode": mode, "repeat": repeat, **{k: v for k, v in r.items() if k != "latencies"}})
                print(f"load {load:.0%} {mode:13s} {r['throughput_rps']:.2f} req/s  easy p50 {r['easy']['p50_ms']:.0f} "
                      f"p99 {r['easy']['p99_ms']:.0f}  hard p50 {r['hard']['p50_ms']:.0f} p99 {r['hard']['p99_ms']:.0f} ms", flush=True)
        rows += [{"load": load, "rate_rps": load * sat, "mode": mode, **pooled(results[mode])} for mode in MODES]
    return {"cpu": cpu_model(), "artifact": str(path), "slots": args.slots, "requests_per_run": args.requests,
            "repeats": args.repeats, "saturation_rps": sat, "scene_iterations": pool["iterations"], "rows": rows,
            "runs": runs, "command": " ".join(sys.argv)}


def pooled(results: list[dict]) -> dict:
    """Repeats of one (load, mode): latency percentiles over all their requests, the mean throughput."""
    out = {"throughput_rps": float(np.mean([r["throughput_rps"] for r in results]))}
    for kind in ("easy", "hard"):
        ms = np.concatenate([r["latencies"][kind] for r in results])
        out[kind] = {"n": int(ms.size), "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}
    return out


def step_costs(path: Path, repeats: int = 10) -> dict[int, float]:
    """ms of one solver step for 1, 2, 4, 8 slots (128 px, one thread): how the step's cost grows with the
    batch decides what sharing steps can gain."""
    from crbp_deploy.runtime.stepper import load_stepper

    stepper = load_stepper(path, threads=1)
    image = np.random.default_rng(0).random((1, 3, 128, 128), dtype=np.float32)
    budget = stepper.budget({})
    out = {}
    for n in (1, 2, 4, 8):
        states = [stepper.encode(image, budget) for _ in range(n)]
        times = []
        for _ in range(repeats):
            for state in states:
                state.active, state.iterations = True, 0
            started = time.perf_counter()
            stepper.advance(states)
            times.append(time.perf_counter() - started)
        out[n] = 1000 * float(np.median(times))
    return out


def table(doc: dict) -> str:
    """Markdown: per load, both modes, and the goal ratios (iteration / request)."""
    lines = ["| load | mode | throughput (req/s) | easy p50 (ms) | easy p99 (ms) | hard p50 (ms) | hard p99 (ms) |",
             "|---|---|---|---|---|---|---|"]
    by = {(r["load"], r["mode"]): r for r in doc["rows"]}
    for load in LOADS:
        for mode in MODES:
            r = by[(load, mode)]
            lines.append(f"| {load:.0%} | {mode} | {r['throughput_rps']:.2f} | {r['easy']['p50_ms']:.0f} | "
                         f"{r['easy']['p99_ms']:.0f} | {r['hard']['p50_ms']:.0f} | {r['hard']['p99_ms']:.0f} |")
        rq = by[(load, "request")]
        for arm in MODES[1:]:
            it = by[(load, arm)]
            lines.append(f"| {load:.0%} | **{arm} / request** | {it['throughput_rps'] / rq['throughput_rps']:.2f}x | "
                         f"{it['easy']['p50_ms'] / rq['easy']['p50_ms']:.2f}x | {it['easy']['p99_ms'] / rq['easy']['p99_ms']:.2f}x | "
                         f"{it['hard']['p50_ms'] / rq['hard']['p50_ms']:.2f}x | {it['hard']['p99_ms'] / rq['hard']['p99_ms']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact", default=str(ROOT / "runs" / "iteration_load" / "crbp-panoptic.onnx"))
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--scenes", type=int, default=48, help="scenes generated (a third easy, a third hard)")
    parser.add_argument("--requests", type=int, default=120, help="Poisson arrivals per run")
    parser.add_argument("--repeats", type=int, default=2, help="runs per load and mode (alternating order)")
    parser.add_argument("--burst", type=int, default=64, help="requests in the saturation burst")
    parser.add_argument("--seed", type=int, default=19)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 24 scenes, 32 requests per run")
    parser.add_argument("--step-costs", action="store_true", help="only time one step for 1, 2, 4, 8 slots")
    parser.add_argument("--out", default=str(ROOT / "docs" / "iteration_load.json"))
    args = parser.parse_args()
    if args.quick:
        args.scenes, args.requests, args.burst, args.repeats = 24, 24, 24, 1
    if args.step_costs:
        costs = step_costs(artifact(Path(args.artifact)))
        print(f"CPU: {cpu_model()}\n\n| slots stepped | ms per step | ms per slot |\n|---|---|---|")
        print("\n".join(f"| {n} | {ms:.1f} | {ms / n:.1f} |" for n, ms in costs.items()))
        return
    doc = run(args)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nCPU: {doc['cpu']}; saturation of request-level batching: {doc['saturation_rps']:.2f} req/s\n")
    print(table(doc))


if __name__ == "__main__":
    main()
