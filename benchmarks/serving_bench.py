"""Serving throughput and latency through a real TorchServe, next to the same pipeline in-process.

    python benchmarks/serving_bench.py [MODEL] --concurrency 1 8 32 --requests 160

MODEL: a checkpoint, a bundled model name (default: the bundled model) or an early-exit .onnx
export. Both sides run the identical request pipeline (`PanopticService`: PNG decode -> ONNX
Runtime early-exit loop -> grouping -> COCO id PNG + base64) on the same .onnx with the same
runtime threads:

- TorchServe: `c` client threads in a closed loop over keep-alive HTTP connections, token auth
  on, the archive's batching (batchSize, maxBatchDelay), one worker;
- in-process: the ideal server with the same batching and no HTTP/Java/queue, in the same closed
  loop: rounds of `c` waiting requests answered in batches of min(c, batchSize) by
  `service.handle`; every request's latency is its round's duration (in a closed loop with `c`
  clients each request waits for the c-1 others ahead of it).

Overhead = in-process throughput / TorchServe throughput (1.0 = free). The two sides alternate
`--repeats` times per level and the best run of each is reported (the machine may be shared).
Clients, Java and the worker share this machine's cores, as a load generator on the serving host would.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def _percentile(values, q):
    return float(np.percentile(np.asarray(values) * 1000.0, q))


def _images(count: int, size: int) -> list[bytes]:
    from PIL import Image

    from crbp_deploy.data.panoptic_synth import generate_sample

    out = []
    for i in range(count):
        buf = io.BytesIO()
        Image.fromarray(generate_sample(i, seed=99, size=size)[0]).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def _free_port(count: int = 5) -> int:
    """A base port P with P..P+count-1 free on 127.0.0.1."""
    for base in range(28000 + os.getpid() % 1000 * count, 65000, count):
        ok = True
        for p in range(base, base + count):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free ports")


def export_early_exit(spec, work: Path):
    """`spec` (checkpoint, bundled name, ...) exported as an early-exit ONNX with its card's budget:
    (model, resolved spec, .onnx path) -- what the serving benchmarks package and serve."""
    from crbp_deploy.export import export_onnx
    from crbp_deploy.modelcard import ModelCard
    from crbp_deploy.sources import resolve_model

    net, spec = resolve_model(spec)
    onnx = work / "model.onnx"
    export_onnx(net, onnx, strategy="loop", source=spec, **ModelCard.of(net).budget.early().kwargs())
    return net, spec, onnx


def write_report(report: dict, out: Path | None) -> None:
    """The benchmark's JSON report to `out` (nothing when None)."""
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out}")


def run_inprocess(service, images, concurrency, requests, batch_size):
    from crbp_deploy.serving.service import RawRequest

    def raw(k):
        return RawRequest({"body": images[k % len(images)]}, {"body": "image/png"})

    service.handle([raw(0)])  # warm-up
    latencies = []
    done = 0
    started = time.perf_counter()
    while done < requests:
        round_size = min(concurrency, requests - done)
        t0 = time.perf_counter()
        for first in range(0, round_size, batch_size):
            chunk = [raw(done + first + j) for j in range(min(batch_size, round_size - first))]
            replies = service.handle(chunk)
            assert all(r.status == 200 for r in replies)
        latencies += [time.perf_counter() - t0] * round_size
        done += round_size
    wall = time.perf_counter() - started
    return {"throughput": requests / wall, "p50_ms": _percentile(latencies, 50), "p99_ms": _percentile(latencies, 99),
            "mean_ms": 1000 * statistics.fmean(latencies), "requests": requests, "seconds": wall}


def run_served(url, token, images, concurrency, requests):
    from crbp_deploy.serving.client import Client

    latencies, batch_sizes, failures = [], [], []
    lock = threading.Lock()
    counter = {"next": 0}

    def worker(warm: int):
        with Client(url, token=token) as client:
            for k in range(warm):
                client.post(images[k % len(images)])
            barrier.wait()
            while True:
                with lock:
                    k = counter["next"]
                    counter["next"] += 1
                if k >= requests:
                    return
                answer = client.post(images[k % len(images)])
                with lock:
                    if answer.ok:
                        latencies.append(answer.seconds)
                        batch_sizes.append(answer.body["batch_size"])
                    else:
                        failures.append(answer.status)

    barrier = threading.Barrier(concurrency + 1)
    threads = [threading.Thread(target=worker, args=(2,)) for _ in range(concurrency)]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    if failures:
        raise RuntimeError(f"{len(failures)} failed requests: {failures[:5]}")
    return {"throughput": requests / wall, "p50_ms": _percentile(latencies, 50), "p99_ms": _percentile(latencies, 99),
            "mean_ms": 1000 * statistics.fmean(latencies), "requests": requests, "seconds": wall,
            "mean_batch": statistics.fmean(batch_sizes), "max_batch": max(batch_sizes)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=160, help="requests per concurrency level")
    parser.add_argument("--size", type=int, default=0, help="image side (0: the card's evaluation size, else 64)")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime threads (both sides)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1, help="TorchServe workers (in-process is one session)")
    parser.add_argument("--max-batch-delay", type=int, default=10, help="ms")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs per level; the best is reported")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from crbp_deploy.artifact import read_card
    from crbp_deploy.export import export_onnx
    from crbp_deploy.modelcard import ModelCard
    from crbp_deploy.sources import resolve_model
    from crbp_deploy.serving.engine import get_engine
    from crbp_deploy.serving.archive import ArchiveConfig, package
    from crbp_deploy.serving.service import PanopticService, RawRequest, ServiceConfig

    with tempfile.TemporaryDirectory(prefix="crbp-serving-bench-") as tmp:
        work = Path(tmp)
        spec = args.model
        if str(spec).endswith(".onnx"):
            onnx, card = Path(spec), read_card(spec) or ModelCard()
        else:
            net, spec = resolve_model(spec)
            card = ModelCard.of(net)
            budget = card.budget.early().kwargs()
            onnx = work / "model.onnx"
            print(f"exporting {spec} (loop, {budget})", flush=True)
            export_onnx(net, onnx, strategy="loop", source=spec, **budget)
        size = args.size or card.image_size
        images = _images(8, size)
        service_config = ServiceConfig(threads=args.threads)
        service = PanopticService(onnx, service_config, name="bench")
        probe = [service.handle([RawRequest({"body": im}, {"body": "image/png"})])[0].body for im in images]
        batched = [r.body for r in service.handle([RawRequest({"body": im}, {"body": "image/png"}) for im in images])]
        invariant = all(b[k] == p[k] for b, p in zip(batched, probe) for k in ("panoptic_png", "iterations", "residual"))
        print(f"batch of {len(images)} == one at a time: {invariant}", flush=True)
        store = work / "store"
        package(onnx, name="bench", out=store, service=service_config,
                config=ArchiveConfig(workers=args.workers, batch_size=args.batch_size,
                                     max_batch_delay_ms=args.max_batch_delay))
        torchserve = get_engine("torchserve")
        server = torchserve.start(store, torchserve.configure(_free_port()), run_dir=work / "run")
        runs = {"inprocess": {}, "torchserve": {}}
        try:
            from crbp_deploy.serving.client import Client

            url = server.predictions_url("bench")
            with Client(url, token=server.token) as client:  # the server answers exactly what in-process does
                for im, expected in zip(images, probe):
                    got = client.post(im).body
                    assert all(got[k] == expected[k] for k in ("panoptic_png", "iterations", "residual")), "answers differ"
            # the two sides alternate, so both see the same background load; best of `repeats` each
            for c in args.concurrency:
                for _ in range(args.repeats):
                    a = run_inprocess(service, images, c, args.requests, args.batch_size)
                    b = run_served(url, server.token, images, c, args.requests)
                    runs["inprocess"].setdefault(c, []).append(a)
                    runs["torchserve"].setdefault(c, []).append(b)
                    print(f"c={c:>2}: in-process {a['throughput']:.1f} img/s (p50 {a['p50_ms']:.0f} ms), TorchServe "
                          f"{b['throughput']:.1f} img/s (p50 {b['p50_ms']:.0f} ms, mean batch {b['mean_batch']:.1f})",
                          flush=True)
        finally:
            server.stop()
        results = {side: {c: max(rs, key=lambda r: r["throughput"]) for c, rs in by_c.items()}
                   for side, by_c in runs.items()}
    iterations = [p["iterations"] for p in probe]
    rows = []
    for c in args.concurrency:
        a, b = results["inprocess"][c], results["torchserve"][c]
        rows.append({"concurrency": c, "inprocess": a, "torchserve": b, "overhead": a["throughput"] / b["throughput"]})
    report = {
        "command": "python benchmarks/serving_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": spec, "image_size": size, "iterations_per_image": iterations,
        "threads": args.threads, "workers": args.workers, "batch_size": args.batch_size,
        "max_batch_delay_ms": args.max_batch_delay,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared)",
        "batch_equals_unbatched": invariant,
        "rows": rows,
        "all_runs": runs,
    }
    print("\n| concurrency | in-process img/s | p50 ms | p99 ms | TorchServe img/s | p50 ms | p99 ms | mean batch | overhead |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        a, b = row["inprocess"], row["torchserve"]
        print(f"| {row['concurrency']} | {a['throughput']:.1f} | {a['p50_ms']:.1f} | {a['p99_ms']:.1f} | "
              f"{b['throughput']:.1f} | {b['p50_ms']:.1f} | {b['p99_ms']:.1f} | {b['mean_batch']:.1f} | {row['overhead']:.2f}x |")
    print(f"\nmodel {spec}, {size}x{size} images, iterations per image {iterations}; {args.threads} runtime thread(s), "
          f"TorchServe {args.workers} worker(s), batchSize {args.batch_size}, maxBatchDelay {args.max_batch_delay} ms")
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
