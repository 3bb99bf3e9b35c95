"""Long fault runs against a real TorchServe (too long for the test suite): a worker killed under
load, and a soak of mixed requests with the worker's memory watched.

    python benchmarks/fault_bench.py [MODEL] --soak 5000 --concurrency 8 --out docs/fault_bench.json

MODEL: a checkpoint or bundled model name (default: the bundled model), exported with the early-exit
loop and packaged like `crbp-deploy package` does (batchSize 8, maxBatchDelay 10 ms, one worker,
token auth on).

- kill: `--concurrency` clients send for `--kill-after` requests, then the worker is SIGKILLed; the
  clients go on until `--after-recovery` requests sent after the kill have succeeded. Reported: requests
  without an answer (must be 0), 5xx answers, recovery time (kill -> first 200 to a request sent after
  the kill), and whether any request sent after recovery failed.
- soak: `--soak` requests from `--concurrency` clients over three image sizes and three budgets, with
  about 3% bad requests (garbage bytes, an absurd budget): every request must get the answer it should
  (200 equal to the in-process answer for its image and budget, or 400); the worker's RSS (with its
  children) is read at request 500 and at the end; p50/p99 latency of the good requests.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_bench import _free_port, _images, _percentile, export_early_exit, write_report  # noqa: E402

COMPARED = ("panoptic_png", "segments_info", "iterations", "residual")
BUDGETS = [{}, {"max_iters": 20, "tol": 0.05}, {"max_iters": 40, "tol": 0.01}]
SIZES = (48, 64, 96)


def _rss(run_dir) -> int:
    """Resident memory of the model worker(s) and their children, in bytes."""
    import psutil

    from crbp_deploy.serving.engine import get_engine

    total = 0
    for proc in get_engine("torchserve").worker_processes(run_dir):
        try:
            total += proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
        except psutil.Error:
            pass
    return total


def _clients(url, token, concurrency, next_job, on_answer):
    """`concurrency` keep-alive clients in a closed loop: next_job() -> (key, data, budget) or None."""
    from crbp_deploy.serving.client import Client

    lost = []

    def loop():
        with Client(url, token=token, timeout=180) as client:
            while True:
                job = next_job()
                if job is None:
                    return
                key, data, budget = job
                sent = time.monotonic()
                try:
                    answer = client.post(data, **budget)
                except Exception as exc:  # noqa: BLE001 - a request without an answer
                    lost.append((key, repr(exc)))
                    continue
                on_answer(key, sent, answer)

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    return threads, lost


def kill_run(server, images, expected, args) -> dict:
    from crbp_deploy.serving.engine import get_engine

    worker_processes = get_engine("torchserve").worker_processes

    lock, stop = threading.Lock(), threading.Event()
    records = []
    counter = iter(range(10**9))

    def next_job():
        if stop.is_set():
            return None
        with lock:
            k = next(counter)
        return k % len(images), images[k % len(images)], {}

    def on_answer(i, sent, answer):
        with lock:
            records.append((sent, time.monotonic(), i, answer))

    (victim,) = worker_processes(server.run_dir)
    threads, lost = _clients(server.predictions_url("bench"), server.token, args.concurrency, next_job, on_answer)
    while len(records) < args.kill_after:
        time.sleep(0.02)
    killed = time.monotonic()
    os.kill(victim.pid, signal.SIGKILL)
    deadline = killed + 120
    while time.monotonic() < deadline:
        with lock:
            ok_after = sum(1 for r in records if r[0] > killed and r[3].status == 200)
        if ok_after >= args.after_recovery:
            break
        time.sleep(0.1)
    stop.set()
    for t in threads:
        t.join(timeout=200)
    new = [w.pid for w in worker_processes(server.run_dir)]
    firsts = sorted(r[1] for r in records if r[0] > killed and r[3].status == 200)
    recovered = firsts[0] if firsts else None
    failed = [r for r in records if r[3].status != 200]
    wrong = sum(1 for r in records if r[3].status == 200 and any(r[3].body[k] != expected[r[2]][k] for k in COMPARED))
    return {
        "requests": len(records) + len(lost),
        "without_answer": len(lost) + sum(t.is_alive() for t in threads),
        "status_5xx": len(failed),
        "share_5xx": len(failed) / max(1, len(records)),
        "statuses_5xx": sorted({r[3].status for r in failed}),
        "messages_5xx": sorted({str(r[3].body.get("message")) for r in failed}),
        "all_5xx_json": all(isinstance(r[3].body, dict) and "message" in r[3].body for r in failed),
        "recovery_s": None if recovered is None else round(recovered - killed, 2),
        "failed_after_recovery": sum(1 for r in records if recovered and r[0] > recovered and r[3].status != 200),
        "wrong_answers": wrong,
        "worker_restarted": bool(new) and victim.pid not in new,
    }


def soak_run(server, service, args) -> dict:
    from crbp_deploy.serving.service import RawRequest

    images = {size: _images(4, size) for size in SIZES}
    expected = {}
    for size, ims in images.items():
        for i, im in enumerate(ims):
            for b, budget in enumerate(BUDGETS):
                headers = {f"X-{k.replace('_', '-')}": str(v) for k, v in budget.items()}
                expected[(size, i, b)] = service.handle([RawRequest({"body": im}, {"body": "image/png"}, headers)])[0].body
    lock = threading.Lock()
    counter = iter(range(args.soak))
    results: dict[int, tuple] = {}
    rss = {}

    def plan(k):
        if k % 50 == 7:
            return ("garbage",), b"this is not an image" * 10, {}
        if k % 50 == 31:
            return ("absurd",), images[64][0], {"max_iters": 10**7}
        size, i, b = SIZES[k % 3], (k // 3) % 4, (k // 12) % 3
        return (size, i, b), images[size][i], BUDGETS[b]

    def next_job():
        with lock:
            k = next(counter, None)
        if k is None:
            return None
        key, data, budget = plan(k)
        return (k, key), data, budget

    def on_answer(job, sent, answer):
        k, key = job
        with lock:
            results[k] = (key, answer)
            if len(results) == 500:
                rss["at_500"] = _rss(server.run_dir)

    started = time.perf_counter()
    threads, lost = _clients(server.predictions_url("bench"), server.token, args.concurrency, next_job, on_answer)
    for t in threads:
        t.join(timeout=3600)
    wall = time.perf_counter() - started
    rss["end"] = _rss(server.run_dir)
    wrong, latencies = [], []
    for k, (key, answer) in results.items():
        if key in (("garbage",), ("absurd",)):
            if answer.status != 400:
                wrong.append((k, key, answer.status))
        elif answer.status != 200 or any(answer.body[c] != expected[key][c] for c in COMPARED):
            wrong.append((k, key, answer.status))
        else:
            latencies.append(answer.seconds)
    return {
        "requests": args.soak,
        "answered": len(results),
        "lost": args.soak - len(results),
        "exceptions": lost[:5],
        "wrong": wrong[:10],
        "wrong_count": len(wrong),
        "bad_requests": sum(1 for key, _ in results.values() if key in (("garbage",), ("absurd",))),
        "seconds": round(wall, 1),
        "throughput": round(len(results) / wall, 1),
        "p50_ms": round(_percentile(latencies, 50), 1),
        "p99_ms": round(_percentile(latencies, 99), 1),
        "p99_over_p50": round(_percentile(latencies, 99) / _percentile(latencies, 50), 2),
        "rss_at_500_mb": round(rss["at_500"] / 2**20, 1),
        "rss_end_mb": round(rss["end"] / 2**20, 1),
        "rss_growth": round(rss["end"] / rss["at_500"] - 1, 4),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--kill-after", type=int, default=200, help="answers before the worker is killed")
    parser.add_argument("--after-recovery", type=int, default=400, help="successes after the kill before stopping")
    parser.add_argument("--soak", type=int, default=5000, help="soak requests (0: skip)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from crbp_deploy.serving.engine import get_engine
    from crbp_deploy.serving.archive import ArchiveConfig, package
    from crbp_deploy.serving.service import PanopticService, RawRequest

    report = {"command": "python benchmarks/fault_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared)"}
    with tempfile.TemporaryDirectory(prefix="crbp-fault-bench-") as tmp:
        work = Path(tmp)
        _, spec, onnx = export_early_exit(args.model, work)
        service = PanopticService(onnx, name="bench")
        images = _images(8, 64)
        expected = [service.handle([RawRequest({"body": im}, {"body": "image/png"})])[0].body for im in images]
        store = work / "store"
        package(onnx, name="bench", out=store, config=ArchiveConfig(batch_size=8, max_batch_delay_ms=10))
        torchserve = get_engine("torchserve")
        server = torchserve.start(store, torchserve.configure(_free_port()), run_dir=work / "run")
        try:
            report["model"] = spec
            report["kill"] = kill_run(server, images, expected, args)
            print("kill:", json.dumps(report["kill"]), flush=True)
            if args.soak:
                report["soak"] = soak_run(server, service, args)
                print("soak:", json.dumps(report["soak"]), flush=True)
        finally:
            server.stop()
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
