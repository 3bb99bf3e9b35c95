"""Ray Serve replicas vs one replica (and TorchServe), on the same archive, through real HTTP.

    python benchmarks/ray_bench.py [MODEL] --replicas 1 2 --concurrency 16 --requests 320 --out docs/ray_bench.json

MODEL: a checkpoint or bundled model name (default: the bundled model), exported with the early-exit
loop and packaged once (batchSize 8, maxBatchDelay 10 ms, 1 runtime thread). First TorchServe (one
worker) answers 8 images x 2 budgets; then for each replica count a local Ray cluster is started with
`get_engine("ray").start`, its answers to the same 16 requests must be identical to TorchServe's
(`panoptic_png`, `segments_info`, `iterations`, `residual`), and `c` keep-alive clients in a closed
loop measure throughput and latency (best of `--repeats`). Clients, Ray's HTTP proxy and the replicas
share this machine's cores, as a load generator on the serving host would.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_bench import _free_port, _images, export_early_exit, run_served, write_report  # noqa: E402

COMPARED = ("panoptic_png", "segments_info", "iterations", "residual", "converged")
BUDGETS = [{}, {"max_iters": 20, "tol": 0.05}]


def _answers(url, token, images):
    from crbp_deploy.serving.client import Client

    with Client(url, token=token) as client:
        return [{k: client.post(im, **b).body.get(k) for k in COMPARED} for im in images for b in BUDGETS]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=320)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    from crbp_deploy.modelcard import ModelCard
    from crbp_deploy.serving.archive import ArchiveConfig, package
    from crbp_deploy.serving.engine import get_engine

    report = {"command": "python benchmarks/ray_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared)",
              "concurrency": args.concurrency, "requests": args.requests, "runs": {}}
    with tempfile.TemporaryDirectory(prefix="crbp-ray-bench-") as tmp:
        work = Path(tmp)
        net, spec, onnx = export_early_exit(args.model, work)
        store = work / "store"
        package(onnx, name="bench", out=store, config=ArchiveConfig(batch_size=8, max_batch_delay_ms=10))
        images = _images(8, ModelCard.of(net).image_size or 64)
        torchserve, rayserve = get_engine("torchserve"), get_engine("ray")
        server = torchserve.start(store, torchserve.configure(_free_port()), run_dir=work / "ts")
        try:
            reference = _answers(server.predictions_url("bench"), server.token, images)
            runs = [run_served(server.predictions_url("bench"), server.token, images, args.concurrency, args.requests)
                    for _ in range(args.repeats)]
            report["runs"]["torchserve (1 worker)"] = max(runs, key=lambda r: r["throughput"])
            print("torchserve:", json.dumps(report["runs"]["torchserve (1 worker)"]), flush=True)
        finally:
            server.stop()
        report["load_average"] = os.getloadavg()
        for replicas in args.replicas:
            config = rayserve.configure(_free_port(10), replicas=replicas)
            ray = rayserve.start(store, config, run_dir=work / f"ray{replicas}")
            try:
                same = _answers(ray.predictions_url("bench"), ray.token, images) == reference
                runs = [run_served(ray.predictions_url("bench"), ray.token, images, args.concurrency, args.requests)
                        for _ in range(args.repeats)]
                best = max(runs, key=lambda r: r["throughput"])
                best["identical_to_torchserve"] = same
                report["runs"][f"ray ({replicas} replica{'s' if replicas > 1 else ''})"] = best
                print(f"ray x{replicas}:", json.dumps(best), flush=True)
            finally:
                ray.stop()
        report["load_average_end"] = os.getloadavg()
    ray_runs = {k: v for k, v in report["runs"].items() if k.startswith("ray")}
    if len(ray_runs) >= 2:
        first, last = list(ray_runs.values())[0], list(ray_runs.values())[-1]
        report["speedup"] = round(last["throughput"] / first["throughput"], 2)
    print("\n| engine | img/s | p50 ms | p99 ms | mean batch | identical to TorchServe |")
    print("|---|---:|---:|---:|---:|---|")
    for name, r in report["runs"].items():
        print(f"| {name} | {r['throughput']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['mean_batch']:.1f} | "
              f"{r.get('identical_to_torchserve', '(reference)')} |")
    if "speedup" in report:
        print(f"\nspeedup {report['speedup']}x")
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
