"""One model, three engines: the same requests through a real TorchServe (whole-request batching in its
handler), a real Ray Serve and a real Triton (both running the iteration-level scheduler) get the same COCO
panoptic JSON within the export tolerance (identical iterations, stop reasons, segments and id maps;
residuals and scores within 1e-4), sent one by one and all at once (requests joining and leaving the
running slots between steps); every bad request gets a 4xx with a message on every engine, and a request
without the key is refused on every engine.

One server per engine for the module; skipped where an engine is not installed (`make setup`).
"""
import concurrent.futures

import pytest
import torch

from crbp_deploy.errors import CrbpError
from crbp_deploy.serving.client import Client
from serving_util import BAD, BUDGET, CATS, TINY, need_torchserve, sample, served

pytestmark = [pytest.mark.serve, pytest.mark.timeout(900)]
VARYING = ("timings_ms", "batch_size")  # how long it took and what it ran with
ENGINES = ("torchserve", "ray", "triton")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """The tiny model exported once (loop ONNX with its pieces), as a .mar store and a Triton repository."""
    from crbp_deploy import checkpoint
    from crbp_deploy.export import export_onnx
    from crbp_deploy.models import create_model
    from crbp_deploy.serving.archive import ArchiveConfig, package
    from crbp_deploy.serving.triton_model import package_triton

    need_torchserve()
    folder = tmp_path_factory.mktemp("conformance")
    torch.manual_seed(1)
    model = create_model("hgru-panoptic", num_classes=4, thing_classes=[0, 1], **TINY)
    meta = {"categories": CATS, "inference": {"budget": BUDGET, "postprocess": {"min_area": 4}}}
    pt = checkpoint.save(model, folder / "tiny.pt", meta=meta)
    onnx = folder / "tiny.onnx"
    export_onnx(checkpoint.load(pt), onnx, strategy="loop", pieces=True, source=str(pt), **BUDGET)
    package(onnx, name="tiny", out=folder / "store", config=ArchiveConfig(batch_size=8, max_batch_delay_ms=20))
    package_triton(onnx, name="tiny", out=folder / "repo")
    return folder


def _server(engine, artifacts, tmp_path_factory):
    if engine == "ray":
        pytest.importorskip("ray", reason="Ray Serve is not installed (pip install 'crbp-deploy[ray]')")
    if engine == "triton":
        from crbp_deploy.serving.triton_engine import wheel_files

        try:
            wheel_files()
        except CrbpError:
            pytest.skip("nvidia-pytriton is not installed (make setup)")
    store = artifacts / ("repo" if engine == "triton" else "store")
    return served(store, tmp_path_factory.mktemp(engine), engine=engine, timeout=400)


@pytest.fixture(scope="module")
def servers(artifacts, tmp_path_factory):
    """The three engines, started one after the other, stopped at the end of the module."""
    from contextlib import ExitStack

    with ExitStack() as stack:
        out = {}
        for engine in ENGINES:
            info = stack.enter_context(_server(engine, artifacts, tmp_path_factory))
            path = "v2/models/tiny/infer" if engine == "triton" else "predictions/tiny"
            info["endpoint"] = f"http://127.0.0.1:{info['port']}/{path}"
            out[engine] = info
        yield out


def _ask(server, data, headers, token="key", ctype="image/png"):
    with Client(server["endpoint"], token=server["token"] if token == "key" else token, timeout=120) as client:
        answer = client.post(data, content_type=ctype, headers=headers)
    return answer.status, {k: v for k, v in answer.body.items() if k not in VARYING}, answer.body


def _close(got: dict, want: dict, name: str) -> None:
    for key in ("iterations", "stopped", "size", "converged", "diverged", "panoptic_png", "categories", "budget", "scale"):
        assert got[key] == want[key], (name, key)
    assert got["residual"] == pytest.approx(want["residual"], rel=1e-4, abs=1e-6), name
    strip = lambda segs: [{k: v for k, v in s.items() if k != "score"} for s in segs]  # noqa: E731
    assert strip(got["segments_info"]) == strip(want["segments_info"]), name
    assert [s["score"] for s in got["segments_info"]] == pytest.approx([s["score"] for s in want["segments_info"]], abs=1e-4)


JOBS = [(f"scene {i}", sample(100 + i, 32 if i % 3 else 40, crop=(37, 29) if i == 4 else None),
         {"X-Max-Iters": str(3 + 7 * (i % 4))} if i % 2 else {}) for i in range(10)]


def test_same_answers_on_every_engine(servers):
    """One by one: the same COCO JSON (within tolerance) from TorchServe, Ray and Triton."""
    for name, data, headers in JOBS:
        answers = {engine: _ask(server, data, headers) for engine, server in servers.items()}
        status, reference, _ = answers["torchserve"]
        assert status == 200, (name, reference)
        for engine in ("ray", "triton"):
            assert answers[engine][0] == 200, (engine, name, answers[engine][1])
            _close(answers[engine][1], reference, f"{engine}: {name}")
    # Ray and Triton answered through the iteration-level scheduler (it reports the time in its queue)
    assert all("queue" in _ask(servers[e], JOBS[0][1], {})[2]["timings_ms"] for e in ("ray", "triton"))


def test_answers_do_not_depend_on_who_else_ran(servers):
    """All at once on each engine: every answer equals TorchServe's one-by-one answer."""
    solo = {name: _ask(servers["torchserve"], data, headers)[1] for name, data, headers in JOBS}
    for engine in ("ray", "triton"):
        with concurrent.futures.ThreadPoolExecutor(len(JOBS)) as pool:
            together = list(pool.map(lambda job: _ask(servers[engine], job[1], job[2]), JOBS))
        for (name, _, _), (status, body, _) in zip(JOBS, together):
            assert status == 200, (engine, name, body)
            _close(body, solo[name], f"{engine} together: {name}")
    assert len({body["iterations"] for body in solo.values()}) > 2  # a real mix of easy and hard


def test_bad_requests_get_a_4xx_with_a_message_everywhere(servers):
    image = sample(80, 32)
    for name, (data, ctype, headers, _, _) in BAD.items():
        for engine, server in servers.items():
            code, body, _ = _ask(server, image if data is None else data, headers, ctype=ctype)
            assert 400 <= code < 500 and body.get("message"), (engine, name, code, body)
    for engine, server in servers.items():
        for token in (None, "wrong"):
            code, body, _ = _ask(server, image, {}, token=token)
            assert 400 <= code < 500 and body.get("message"), (engine, token, code, body)
