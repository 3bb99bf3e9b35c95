"""Helpers shared by the tests that run a real server (test_serving, test_faults, test_engines):
tiny models, test images, the CLI in a subprocess, free loopback ports, and a client pool.

Kept as plain functions (plus one fixture factory) so every module starts its own server: a test that
kills workers or restarts a server must not disturb the server another module is asserting on.
"""
from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import threading
import uuid
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from PIL import Image

from crbp_deploy.data.panoptic_synth import CATEGORIES, generate_sample

TINY = {"encoder_channels": 8, "channels": 6, "kernel_size": 3, "head_channels": 8, "downsample": 1}
CATS = sorted(CATEGORIES, key=lambda c: c["id"])
BUDGET = {"max_iters": 30, "tol": 1e-2}
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
#: What must be equal between two answers for the same image and budget (timings may differ).
COMPARED = ("segments_info", "panoptic_png", "iterations", "residual", "converged", "size")


def need_torchserve() -> None:
    pytest.importorskip("ts", reason="torchserve is not installed (pip install 'crbp-deploy[serve]')")
    pytest.importorskip("model_archiver", reason="torch-model-archiver is not installed")
    if not (shutil.which("java") or os.environ.get("JAVA_HOME")):
        pytest.skip("TorchServe needs Java 17")


def cli(*args, timeout=300, env=None):
    """`crbp-deploy ARGS` in a subprocess (the server outlives a test's process state)."""
    return subprocess.run([sys.executable, "-m", "crbp_deploy.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**ENV, **(env or {})})


def free_ports(count=5) -> int:
    """A base port P with P..P+count-1 free on 127.0.0.1."""
    rng = np.random.default_rng(uuid.uuid4().int % 2**32)
    for _ in range(200):
        base = int(rng.integers(20000, 60000))
        socks = []
        try:
            for p in range(base, base + count):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port block")


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def sample(index: int, size: int, crop: tuple[int, int] | None = None) -> bytes:
    rgb = generate_sample(index, seed=7, size=size)[0]
    if crop:
        rgb = rgb[: crop[0], : crop[1]]
    return png(np.ascontiguousarray(rgb))


def bomb_png(w: int, h: int) -> bytes:
    """A valid PNG header that claims w x h pixels, with a tiny body (as in test_imageio)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 10)) + chunk(b"IEND", b"")


def multipart(fields: dict) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, (value, ctype) in fields.items():
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"'
        if ctype:
            head += f'; filename="{name}.png"\r\nContent-Type: {ctype}'
        parts.append(head.encode() + b"\r\n\r\n" + value + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


BAD = {
    "empty body": (b"", "image/png", {}, 400, "empty"),
    "truncated PNG": (sample(3, 32)[:200], "image/png", {}, 400, "truncated"),
    "plain text as text/plain": (b"hello, server", "text/plain", {}, 415, "text/plain"),
    "plain text as octet-stream": (b"hello, server", "application/octet-stream", {}, 400, "not an image"),
    "1x1 image": (png(np.zeros((1, 1, 3), np.uint8)), "image/png", {}, 400, "too small"),
    "20000x20000 header": (bomb_png(20000, 20000), "image/png", {}, 400, "decompression bomb"),
    "JSON content type": (b'{"image": "x"}', "application/json", {}, 415, "application/json"),
    "form content type": (b"a=1", "application/x-www-form-urlencoded", {}, 415, "x-www-form-urlencoded"),
    "absurd max_iters": (None, "image/png", {"X-Max-Iters": "1000000"}, 400, "max_iters=1000000"),
    "non-integer max_iters": (None, "image/png", {"X-Max-Iters": "ten"}, 400, "integer"),
    "negative tol": (None, "image/png", {"X-Tol": "-1"}, 400, "tol"),
}


def same(answer: dict, expected: dict) -> None:
    for key in COMPARED:
        assert answer[key] == expected[key], key


def tiny_artifacts(folder) -> dict:
    """A tiny random panoptic model (seed 1: gives segments and per-image iteration counts) as a
    checkpoint and as an early-exit ONNX export."""
    from crbp_deploy import checkpoint
    from crbp_deploy.export import export_onnx
    from crbp_deploy.models import create_model

    torch.manual_seed(1)
    model = create_model("hgru-panoptic", num_classes=4, thing_classes=[0, 1], **TINY)
    meta = {"categories": CATS, "inference": {"budget": BUDGET, "postprocess": {"min_area": 4}}}
    pt = checkpoint.save(model, folder / "tiny.pt", meta=meta)
    onnx = folder / "tiny.onnx"
    export_onnx(checkpoint.load(pt), onnx, strategy="loop", source=str(pt), **BUDGET)
    return {"pt": pt, "onnx": onnx, "folder": folder, "model": model, "meta": meta}


def tiny_store(tmp_path_factory, max_batch_delay_ms=10) -> dict:
    """A model store holding the tiny ONNX model as `tiny.mar` (batchSize 8): {"path", "onnx"}."""
    from crbp_deploy.serving.archive import ArchiveConfig, package

    need_torchserve()
    built = tiny_artifacts(tmp_path_factory.mktemp("models"))
    store = tmp_path_factory.mktemp("store")
    package(built["onnx"], name="tiny", out=store,
            config=ArchiveConfig(batch_size=8, max_batch_delay_ms=max_batch_delay_ms))
    return {"path": store, "onnx": built["onnx"]}


@contextmanager
def served(store, run, *extra, engine="torchserve", timeout=300):
    """`crbp-deploy serve --engine ENGINE` on free ports; `serve --stop` on the way out, even on failure."""
    from crbp_deploy.serving.engine import get_engine, read_keys

    port = free_ports(10)  # the most any engine uses (Ray: P..P+8)
    started = cli("serve", "--engine", engine, "--model-store", store, "--port", port, "--run-dir", run, *extra,
                  timeout=timeout)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield {"port": port, "run": run, "store": store, "stdout": started.stdout, "token": read_keys(run).get("inference"),
               "pid": get_engine(engine).running(run), "url": f"http://127.0.0.1:{port}/predictions/"}
    finally:
        cli("serve", "--stop", "--port", port, "--run-dir", run)


def hammer(url, token, jobs, clients, timeout=300):
    """Send `jobs` [(data, budget)] to `url` from `clients` threads; answers by job index (none may raise)."""
    from crbp_deploy.serving.client import Client

    answers = [None] * len(jobs)
    errors = []
    lock = threading.Lock()
    cursor = iter(range(len(jobs)))

    def worker():
        with Client(url, token=token, timeout=timeout) as client:
            while True:
                with lock:
                    k = next(cursor, None)
                if k is None:
                    return
                data, budget = jobs[k]
                try:
                    answers[k] = client.post(data, **budget)
                except Exception as exc:  # noqa: BLE001 - recorded, asserted below
                    errors.append((k, repr(exc)))

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    assert not any(t.is_alive() for t in threads), "clients still waiting after the timeout"
    assert not errors, errors[:3]
    return answers
