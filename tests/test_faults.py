"""Faults against a real TorchServe: the model worker killed under load, the server stopped (and
crashed) and started again on the same model store, and slow or broken clients next to good ones.

One server per module, on its own ports, so killing its worker never disturbs test_serving's server.
Every socket has a timeout and every client thread a join deadline: a fault may fail a test, never hang it.
"""
import os
import signal
import socket
import threading
import time

import psutil
import pytest

from crbp_deploy.serving.client import Client
from crbp_deploy.serving.engine import get_engine, read_keys
from serving_util import cli, same, sample, served, tiny_store

pytestmark = [pytest.mark.serve, pytest.mark.timeout(600)]
TORCHSERVE = get_engine("torchserve")
worker_processes = TORCHSERVE.worker_processes


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tiny_store(tmp_path_factory)["path"]


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    with served(store, tmp_path_factory.mktemp("run")) as info:
        yield info


def _post(server, data, **kwargs):
    with Client(server["url"] + "tiny", token=server["token"], timeout=60) as client:
        return client.post(data, **kwargs)


def _wait_worker(run, old_pids=(), timeout=60.0):
    """A live worker whose pid is not in `old_pids` (TorchServe restarts a dead one by itself)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fresh = [w for w in worker_processes(run) if w.pid not in old_pids]
        if fresh:
            return fresh[0]
        time.sleep(0.2)
    raise AssertionError(f"no new worker within {timeout} s")


def test_worker_killed_under_load(server):
    """SIGKILL the worker while 8 clients send: every request is answered (200, or a JSON 5xx for the
    ones it held), TorchServe starts a new worker, and every request sent after recovery succeeds."""
    images = [sample(60 + i, 32) for i in range(4)]
    expected = {i: _post(server, im).body for i, im in enumerate(images)}
    records, errors = [], []
    lock, stop = threading.Lock(), threading.Event()

    def client_loop(k):
        with Client(server["url"] + "tiny", token=server["token"], timeout=60) as client:
            n = 0
            while not stop.is_set():
                i = (k + n) % len(images)
                n += 1
                sent = time.monotonic()
                try:
                    answer = client.post(images[i])
                except Exception as exc:  # noqa: BLE001 - a request without an answer fails the test
                    errors.append(repr(exc))
                    continue
                with lock:
                    records.append((sent, time.monotonic(), i, answer))

    (victim,) = worker_processes(server["run"])
    threads = [threading.Thread(target=client_loop, args=(k,), daemon=True) for k in range(8)]
    for t in threads:
        t.start()
    while len(records) < 40:
        time.sleep(0.05)
    killed_at = time.monotonic()
    os.kill(victim.pid, signal.SIGKILL)
    new = _wait_worker(server["run"], {victim.pid})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # run on until 80 answers to requests sent after the kill succeeded
        with lock:
            after = [r for r in records if r[0] > killed_at and r[3].status == 200]
        if len(after) >= 80:
            break
        time.sleep(0.1)
    stop.set()
    for t in threads:
        t.join(timeout=90)
    assert not any(t.is_alive() for t in threads), "a client got no answer within 90 s"
    assert not errors, errors[:3]
    failed = [r for r in records if r[3].status != 200]
    for _, _, _, answer in failed:
        assert answer.status >= 500 and isinstance(answer.body, dict) and answer.body.get("message"), answer
    ok_after = sorted(r[1] for r in records if r[0] > killed_at and r[3].status == 200)
    assert ok_after, "no request succeeded after the kill"
    recovered_at = ok_after[0]
    late = [r for r in records if r[0] > recovered_at and r[3].status != 200]
    assert not late, [(r[3].status, r[3].body) for r in late[:3]]
    for _, _, i, answer in records:
        if answer.status == 200:
            same(answer.body, expected[i])
    assert new.is_running() and new.pid != victim.pid
    print(f"\nworker kill: {len(records)} requests, {len(failed)} 5xx "
          f"({sorted({r[3].status for r in failed})}), recovery {recovered_at - killed_at:.1f} s")
    assert recovered_at - killed_at < 30


def _raw(port, head: bytes, body: bytes = b"", timeout=20.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.sendall(head + body)
    return sock


def _head(server, length, extra=b""):
    return (b"POST /predictions/tiny HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
            + f"Authorization: Bearer {server['token']}\r\nContent-Length: {length}\r\n".encode() + extra + b"\r\n")


def _status_or_closed(sock) -> int | None:
    """The HTTP status the server sent, or None when it closed the connection without one."""
    data = b""
    try:
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    except ConnectionResetError:
        return None
    finally:
        sock.close()
    return int(data.split()[1]) if data.startswith(b"HTTP/") else None


def test_slow_and_broken_clients_do_not_stop_the_others(server):
    data = sample(70, 32)
    reference = _post(server, data).body
    (worker,) = worker_processes(server["run"])
    # a body that stops mid-upload: the connection stays open, the server must not wait on it
    stalled = [_raw(server["port"], _head(server, len(data)), data[: len(data) // 3]) for _ in range(4)]
    # clients that send a whole request and disconnect before the answer
    for _ in range(8):
        _raw(server["port"], _head(server, len(data)), data).close()
    # oversized headers (64 KiB): TorchServe refuses more than 8 KiB with 400 (measured); never a hang
    big = _raw(server["port"], _head(server, len(data), b"X-Pad: " + b"a" * 65536 + b"\r\n"), data)
    assert _status_or_closed(big) == 400
    started = time.monotonic()
    answers = [_post(server, data) for _ in range(5)]
    assert time.monotonic() - started < 30
    for answer in answers:
        assert answer.status == 200, answer.body
        same(answer.body, reference)
    for sock in stalled:
        sock.close()
    after = _post(server, data)
    assert after.status == 200
    same(after.body, reference)
    assert worker.is_running() and worker_processes(server["run"])[0].pid == worker.pid  # no worker died


def _start_and_compare(server, args, data, expected):
    """`crbp-deploy serve ARGS`, then the model must answer `data` as it did before (no other step)."""
    r = cli("serve", *args)
    assert r.returncode == 0, r.stdout + r.stderr
    server["token"] = read_keys(server["run"])["inference"]
    answer = _post(server, data)
    assert answer.status == 200, answer.body
    same(answer.body, expected)


def test_restart_on_the_same_store(server):
    """`serve --stop` + `serve`, then a crashed server (Java SIGKILLed) + `serve`: the model answers
    again with no manual step, and answers what it answered before."""
    data = sample(71, 40)
    before = _post(server, data)
    assert before.status == 200
    args = ("--model-store", server["store"], "--port", server["port"], "--run-dir", server["run"])
    r = cli("serve", "--stop", "--port", server["port"], "--run-dir", server["run"])
    assert r.returncode == 0 and "stopped" in r.stdout, r.stdout + r.stderr
    _start_and_compare(server, args, data, before.body)

    java = psutil.Process(TORCHSERVE.running(server["run"]))
    workers = worker_processes(server["run"])
    java.kill()  # a crash: no shutdown hook, the pid file stays behind
    java.wait(timeout=30)
    gone, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, "workers outlived their server by 30 s"
    _start_and_compare(server, args, data, before.body)
