"""Adversarial load against a real TorchServe (`crbp-deploy serve`): does one abusive client take it down?

    python benchmarks/adversarial_load.py [--workers 2 --batch-size 1] [--baseline-s 40 --attack-s 60]

The bundled model is packaged as `crbp-deploy package` does (early-exit ONNX with its pieces) with the server's defaults (ServiceConfig: cost cap,
deadline, scale policy, admission) and served on 127.0.0.1 with auth on. Two phases, same server:

1. baseline: a steady stream of small scenes (128 px, the card's scale; one every `--small-every` s,
   open loop: sent on schedule whether or not the previous one was answered), client "steady";
2. attack: the same stream, plus
   - "large": every `--large-every` s the largest image the server accepts (2048 x 2048 noise at
     X-Scale: native, X-Max-Iters: 200, X-Tol: 0 -- the issue's attack), alternating with the largest
     native side the server does accept (found by a probe before the phases, descending sides);
   - "flood": small scenes at `--flood-factor` x the sustainable rate (workers / the baseline's p50).

Reported: small scenes' p50/p99 in both phases and their ratio; every status per client (200, 413,
429, 503, other 5xx) with `stopped` of the 200s; unanswered requests (client timeout or connection
error); the large requests' latency against the deadline (+10%); the workers' RSS (max over the run);
whether any worker process was replaced (killed by a timeout) and the TorchServe log's timeout lines.
The client threads share the machine's cores with the server, as a load generator on the host would.
"""
from __future__ import annotations

import argparse
import io
import json
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
#: Requests one run keeps open at most; a send due while all are open is recorded as not sent ("client
#: saturated"), so the load stays open-loop and a slow server cannot pile up sends in the client.
MAX_IN_FLIGHT = 128


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _scenes(count: int, size: int) -> list[bytes]:
    from crbp_deploy.data.panoptic_synth import generate_sample

    return [_png(generate_sample(i, seed=11, size=size)[0]) for i in range(count)]


def _noise(side: int) -> bytes:
    return _png((np.random.default_rng(side).random((side, side, 3)) * 255).astype(np.uint8))


def _free_port(count: int = 5) -> int:
    from crbp_deploy.serving.engine import port_free

    for base in range(23000, 60000, 7):
        if all(port_free("127.0.0.1", p) for p in range(base, base + count)):
            return base
    raise RuntimeError("no free port block")


class Load:
    """Open-loop senders: each request is sent at its time on a pool thread; every result is recorded."""

    def __init__(self, url: str, token: str | None, timeout_s: float):
        import requests

        self.url, self.timeout_s = url, timeout_s
        self.auth = {"Authorization": f"Bearer {token}"} if token else {}
        self.pool = ThreadPoolExecutor(max_workers=MAX_IN_FLIGHT)
        self.in_flight = threading.Semaphore(MAX_IN_FLIGHT)
        self.results: list[dict] = []
        self.lock = threading.Lock()
        self.local = threading.local()
        self.requests = requests

    def _session(self):
        if not hasattr(self.local, "s"):
            self.local.s = self.requests.Session()
        return self.local.s

    def _send(self, phase: str, client: str, body: bytes, headers: dict) -> None:
        started = time.perf_counter()
        row = {"phase": phase, "client": client, "side": headers.pop("_side", 0)}
        try:
            r = self._session().post(self.url, data=body, timeout=self.timeout_s, headers={
                **self.auth, "Content-Type": "image/png", "X-Client-Id": client, **headers})
            row["status"] = r.status_code
            row["retry_after"] = r.headers.get("Retry-After")
            try:
                doc = r.json()
            except ValueError:
                doc = {}
            row.update(stopped=doc.get("stopped"), iterations=doc.get("iterations"),
                       message=(doc.get("message") or "")[:160])
        except Exception as exc:  # noqa: BLE001 -- an unanswered request is a result
            row["status"] = None
            row["message"] = f"{type(exc).__name__}: {exc}"[:160]
        row["latency_s"] = time.perf_counter() - started
        with self.lock:
            self.results.append(row)
        self.in_flight.release()

    def every(self, phase: str, client: str, period_s: float, until: float, make) -> threading.Thread:
        """Send `make(k)` -> (body, headers) every `period_s` until `until` (monotonic), in a thread."""

        def loop():
            k, start = 0, time.monotonic()
            while True:
                at = start + k * period_s
                if at >= until:
                    return
                time.sleep(max(0.0, at - time.monotonic()))
                body, headers = make(k)
                if self.in_flight.acquire(blocking=False):
                    self.pool.submit(self._send, phase, client, body, dict(headers))
                else:
                    with self.lock:
                        self.results.append({"phase": phase, "client": client, "side": 0, "status": "not sent",
                                             "latency_s": 0.0})
                k += 1

        t = threading.Thread(target=loop, daemon=True)
        t.start()
        return t


def _probe(url: str, token: str | None, sides=(1536, 1024, 768, 640, 512, 384, 256)) -> tuple[int, list]:
    """The largest native side (noise, max_iters 200, tol 0) the server accepts; what each probe got."""
    import requests

    seen = []
    for side in sides:
        started = time.perf_counter()
        r = requests.post(url, data=_noise(side), timeout=130, headers={
            "Content-Type": "image/png", "X-Scale": "native", "X-Max-Iters": "200", "X-Tol": "0",
            "X-Client-Id": "probe", **({"Authorization": f"Bearer {token}"} if token else {})})
        doc = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
        seen.append({"side": side, "status": r.status_code, "latency_ms": round(1000 * (time.perf_counter() - started)),
                     "stopped": doc.get("stopped"), "iterations": doc.get("iterations")})
        if r.status_code == 200:
            return side, seen
        time.sleep(0.5)
    return 0, seen


def _rss(engine, run_dir) -> dict[int, int]:
    out = {}
    for p in engine.worker_processes(run_dir):
        try:
            out[p.pid] = p.memory_info().rss
        except Exception:  # noqa: BLE001 -- a worker that just died has no RSS
            pass
    return out


def _summary(rows: list[dict], deadline_ms: float) -> dict:
    def pct(values, q):
        return round(float(np.percentile(values, q)) * 1000, 1) if values else None

    by = defaultdict(list)
    for r in rows:
        by[(r["phase"], r["client"])].append(r)
    out = {}
    for (phase, client), rs in sorted(by.items()):
        ok = [r["latency_s"] for r in rs if r["status"] == 200]
        every = [r["latency_s"] for r in rs if isinstance(r["status"], int)]
        statuses = Counter(str(r["status"]) for r in rs)
        out[f"{phase}/{client}"] = {
            "requests": len(rs), "statuses": dict(statuses),
            "stopped": dict(Counter(r.get("stopped") for r in rs if r["status"] == 200)),
            "p50_ms_200": pct(ok, 50), "p99_ms_200": pct(ok, 99), "p50_ms_all": pct(every, 50),
            "p99_ms_all": pct(every, 99), "max_ms_all": pct(every, 100),
            "unanswered": sum(r["status"] is None for r in rs),
            "5xx": sum(1 for r in rs if isinstance(r["status"], int) and r["status"] >= 500),
            "said": {str(st): next((r.get("message") or "") for r in rs if r["status"] == st)
                     for st in {r["status"] for r in rs} if st != 200},
            "retry_after": dict(Counter(r.get("retry_after") for r in rs if r.get("retry_after"))),
        }
    large = [r for r in rows if r["client"] == "large"]
    out["large_requests"] = [{"side": r["side"], "status": r["status"], "latency_ms": round(r["latency_s"] * 1000),
                              "stopped": r.get("stopped"), "iterations": r.get("iterations"),
                              "within_deadline_plus_10pct": r["latency_s"] * 1000 <= 1.1 * deadline_ms}
                             for r in large]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="crbp-panoptic",
                        help="what `crbp-deploy package` packages (default: the bundled model, exported with its "
                             "pieces, so the service's scheduler stops each request at its deadline)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--small-every", type=float, default=0.5, help="s between small scenes")
    parser.add_argument("--large-every", type=float, default=6.0, help="s between large requests")
    parser.add_argument("--flood-factor", type=float, default=10.0)
    parser.add_argument("--baseline-s", type=float, default=40.0)
    parser.add_argument("--attack-s", type=float, default=60.0)
    parser.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout` ends the run: the server is still stopped

    from crbp_deploy.serving.archive import ArchiveConfig, package
    from crbp_deploy.serving.engine import get_engine
    from crbp_deploy.serving.service import ServiceConfig

    service = ServiceConfig()
    scenes = _scenes(16, 128)
    with tempfile.TemporaryDirectory(prefix="crbp-adversarial-") as tmp:
        work = Path(tmp)
        package(args.model, name="crbp-panoptic", out=work / "store", service=service, progress=None,
                config=ArchiveConfig(workers=args.workers, batch_size=args.batch_size))
        engine = get_engine("torchserve")
        server = engine.start(work / "store", engine.configure(_free_port()), run_dir=work / "run")
        try:
            report = _attack(args, engine, server, work / "run", scenes, service)
        finally:
            server.stop()
    report["command"] = "python benchmarks/adversarial_load.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _attack(args, engine, server, run_dir: Path, scenes: list[bytes], service) -> dict:
    url = server.predictions_url("crbp-panoptic")
    workers_before = sorted(p.pid for p in engine.worker_processes(run_dir))
    load = Load(url, server.token, timeout_s=130.0)
    rss: dict[int, int] = {}
    stop = threading.Event()

    def sample_rss():
        while not stop.is_set():
            for pid, value in _rss(engine, run_dir).items():
                rss[pid] = max(rss.get(pid, 0), value)
            stop.wait(1.0)

    threading.Thread(target=sample_rss, daemon=True).start()
    largest, probes = _probe(url, server.token)
    time.sleep(service.deadline_ms / 1000)  # the probe's charge drains
    small = lambda k: (scenes[k % len(scenes)], {})  # noqa: E731
    end = time.monotonic() + args.baseline_s
    load.every("baseline", "steady", args.small_every, end, small).join()
    time.sleep(2.0)
    done = [r["latency_s"] for r in load.results if r["phase"] == "baseline" and r["status"] == 200]
    sustainable = args.workers / float(np.median(done))
    big = {"X-Scale": "native", "X-Max-Iters": "200", "X-Tol": "0"}
    bodies = {2048: _noise(2048), largest: _noise(largest)} if largest else {2048: _noise(2048)}
    sides = list(bodies)
    end = time.monotonic() + args.attack_s
    threads = [
        load.every("attack", "steady", args.small_every, end, small),
        load.every("attack", "large", args.large_every, end,
                   lambda k: (bodies[sides[k % len(sides)]], {**big, "_side": sides[k % len(sides)]})),
        load.every("attack", "flood", 1.0 / (args.flood_factor * sustainable), end,
                   lambda k: (scenes[k % len(scenes)], {})),
    ]
    for t in threads:
        t.join()
    load.pool.shutdown(wait=True)
    stop.set()
    workers_after = sorted(p.pid for p in engine.worker_processes(run_dir))
    logs = engine.log_dir(run_dir)
    timeouts = subprocess.run(["grep", "-rihc", "timeout", str(logs)], capture_output=True, text=True).stdout
    summary = _summary(load.results, service.deadline_ms)
    base, att = summary.get("baseline/steady", {}), summary.get("attack/steady", {})
    return {
        "cpu": _cpu(), "workers": args.workers, "batch_size": args.batch_size,
        "service": {k: getattr(service, k) for k in ("max_cost", "deadline_ms", "scale", "admission", "client_share")},
        "largest_native_side_accepted": largest, "probe": probes,
        "sustainable_rps": round(sustainable, 2), "flood_rps": round(args.flood_factor * sustainable, 1),
        "small_p99_ratio": round(att["p99_ms_all"] / base["p99_ms_all"], 2) if base and att else None,
        "summary": summary,
        "worker_rss_mb": {str(pid): round(v / 2**20) for pid, v in rss.items()},
        "workers_replaced": workers_before != workers_after, "workers_before": workers_before,
        "workers_after": workers_after,
        "log_lines_with_timeout": sum(int(n) for n in timeouts.split() if n.isdigit()),
    }


def _cpu() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Model name"))
    except Exception:  # noqa: BLE001
        return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
