"""Serving against a real TorchServe on 127.0.0.1: round trips equal local predictions exactly, bad
inputs get 4xx JSON errors and the server keeps serving, 200 concurrent requests through TorchServe's
batching all come back right, metrics are on /metrics, and `serve --stop` waits for the exit.

One server per module (started with `crbp-deploy serve`, stopped at the end even on failure), with
three tiny models: `tiny` (early-exit ONNX, batchSize 8), `tiny-pt` (the checkpoint, PyTorch) and
`tiny-nan` (a checkpoint whose state turns NaN: it must answer `diverged`, never `converged`).
"""
import json
import time
import urllib.error
import urllib.request

import pytest
import torch

from crbp_deploy import checkpoint
from crbp_deploy.serving.archive import ArchiveConfig, package
from crbp_deploy.serving.client import Client
from crbp_deploy.serving.engine import get_engine
from crbp_deploy.serving.service import PanopticService, RawRequest
from serving_util import (BAD, BUDGET, CATS, COMPARED, cli, hammer, multipart, need_torchserve, same, sample, served,
                          tiny_artifacts)

pytestmark = pytest.mark.serve


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    need_torchserve()
    built = tiny_artifacts(tmp_path_factory.mktemp("models"))
    model = built.pop("model")
    with torch.no_grad():
        model.cell.gamma.fill_(float("nan"))  # the first recurrent step turns the state NaN
    built["nan_pt"] = checkpoint.save(model, built["folder"] / "tiny-nan.pt", meta=built.pop("meta"))
    return built


@pytest.fixture(scope="module")
def server(artifacts, tmp_path_factory):
    """`crbp-deploy package` + `crbp-deploy serve` on free ports; stopped at the end even on failure."""
    store = tmp_path_factory.mktemp("store")
    r = cli("package", str(artifacts["onnx"]), "--name", "tiny", "--out", str(store),
             "--batch-size", "8", "--max-batch-delay", "40", "--max-iters-limit", "50")
    assert r.returncode == 0, r.stderr
    package(artifacts["pt"], name="tiny-pt", out=store, fmt="checkpoint", config=ArchiveConfig(batch_size=4))
    package(artifacts["nan_pt"], name="tiny-nan", out=store, fmt="checkpoint", config=ArchiveConfig(batch_size=1))
    with served(store, tmp_path_factory.mktemp("run")) as info:
        yield info


@pytest.fixture(scope="module")
def local(artifacts):
    """What the served ONNX model must answer: the same service, in this process, one image at a time."""
    service = PanopticService(artifacts["onnx"])

    def answer(data: bytes, **budget) -> dict:
        headers = {f"X-{k.replace('_', '-')}": str(v) for k, v in budget.items()}
        reply = service.handle([RawRequest({"body": data}, {"body": "image/png"}, headers)])[0]
        assert reply.status == 200, reply.body
        return json.loads(reply.json())

    return answer


# --- the pieces, without a server ------------------------------------------------------------------


def test_budget_rules(artifacts):
    from crbp_deploy.serving.service import RequestError, ServiceConfig

    service = PanopticService(artifacts["onnx"], ServiceConfig(max_iters_limit=40))
    assert service.resolve_budget({}, {}) == (BUDGET, {}, False)
    assert service.resolve_budget({"max_iters": b"7"}, {"X-Tol": "0.5"}) == ({"max_iters": 7, "tol": 0.5},
                                                                             {"max_iters": 7, "tol": 0.5}, False)
    assert service.resolve_budget({}, {"x-max-iters": "400"})[0]["max_iters"] == 40  # clamped to the limit
    for fields, headers, words in [
        ({"max_iters": b"5"}, {"X-Max-Iters": "6"}, "given twice"),
        ({}, {"X-Max-Iters": "0"}, "outside 1..10000"),
        ({}, {"X-Max-Iters": "2.5"}, "integer"),
        ({}, {"X-Tol": "nan"}, "finite"),
    ]:
        with pytest.raises(RequestError, match=words):
            service.resolve_budget(fields, headers)
    reply = service.handle([RawRequest({"body": sample(0, 32), "colour": b"red"}, {"body": "image/png"})])[0]
    assert reply.status == 400 and "'colour'" in reply.body["message"]


def test_only_batch_invariant_backends_batch(artifacts):
    """One-thread ONNX Runtime on CPU runs batches; everything else one image per model call, and
    both give the one-at-a-time answers."""
    from crbp_deploy.serving.service import ServiceConfig

    images = [sample(40 + i, 32) for i in range(3)]
    for artifact, threads, invariant in ((artifacts["onnx"], 1, True), (artifacts["onnx"], 2, False),
                                         (artifacts["pt"], 1, False)):
        service = PanopticService(artifact, ServiceConfig(threads=threads))
        assert service.batch_invariant is invariant
        together = service.handle([RawRequest({"body": im}, {"body": "image/png"}) for im in images])
        alone = [service.handle([RawRequest({"body": im}, {"body": "image/png"})])[0] for im in images]
        assert [r.body["batch_size"] for r in together] == ([3, 3, 3] if invariant else [1, 1, 1])
        for a, b in zip(together, alone):
            assert {k: a.body[k] for k in COMPARED} == {k: b.body[k] for k in COMPARED}
    torch.set_num_threads(1)


def test_package_refuses_a_limit_below_the_default(artifacts, tmp_path):
    from crbp_deploy.errors import ConfigError
    from crbp_deploy.serving.service import ServiceConfig

    with pytest.raises(ConfigError, match="max_iters_limit=10 is below the model's default max_iters=30"):
        package(artifacts["pt"], name="x", out=tmp_path, fmt="checkpoint", service=ServiceConfig(max_iters_limit=10))
    assert not list(tmp_path.glob("*.mar"))


def test_generated_config_is_explicit(tmp_path):
    from crbp_deploy.serving.server import ServerConfig, config_properties

    text = config_properties(ServerConfig(port=9100, auth=False), tmp_path, ["a", "b"], tmp_path / "m.yaml")
    props = dict(line.split("=", 1) for line in text.splitlines() if not line.startswith("#"))
    assert props["inference_address"] == "http://127.0.0.1:9100"
    assert props["management_address"] == "http://127.0.0.1:9101"
    assert props["metrics_address"] == "http://127.0.0.1:9102"
    assert (props["grpc_inference_port"], props["grpc_management_port"]) == ("9103", "9104")
    assert props["load_models"] == "a.mar,b.mar" and props["enable_model_api"] == "false"
    assert props["disable_token_authorization"] == "true" and props["metrics_mode"] == "prometheus"


def test_client_helpers():
    from crbp_deploy.errors import CrbpError
    from crbp_deploy.serving.client import predictions_url, sniff_content_type

    assert predictions_url("http://127.0.0.1:8080") == "http://127.0.0.1:8080/predictions/crbp-panoptic"
    assert predictions_url("http://127.0.0.1:8080/", "m") == "http://127.0.0.1:8080/predictions/m"
    assert predictions_url("http://h:1/predictions/x") == "http://h:1/predictions/x"
    with pytest.raises(CrbpError, match="not an http"):
        predictions_url("127.0.0.1:8080")
    assert sniff_content_type(sample(0, 32)) == "image/png"
    assert sniff_content_type(b"hello") == "application/octet-stream"


# --- against the real server ----------------------------------------------------------------------


def _post(server, model, data, **kwargs):
    with Client(server["url"] + model, token=server["token"]) as client:
        return client.post(data, **kwargs)


def test_serve_prints_urls_and_key_file(server):
    out = server["stdout"]
    assert f"http://127.0.0.1:{server['port']}/predictions/tiny" in out
    assert f"http://127.0.0.1:{server['port'] + 1}/models" in out
    assert f"http://127.0.0.1:{server['port'] + 2}/metrics" in out
    assert str(server["run"] / "key_file.json") in out
    assert server["token"] not in out  # the key file is named, the key itself is not printed
    assert "metrics_mode=prometheus" in (server["run"] / "config.properties").read_text()


def test_auth_is_on(server, artifacts):
    request = urllib.request.Request(f"http://127.0.0.1:{server['port']}/ping")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=10)
    assert err.value.code in (400, 401)
    with Client(server["url"] + "tiny", token="wrong") as client:
        answer = client.post(sample(0, 32))
    assert answer.status in (400, 401) and "Token" in answer.body.get("message", "")


def test_onnx_round_trip_equals_local(server, local):
    data = sample(1, 40)
    answer = _post(server, "tiny", data)
    assert answer.status == 200, answer.body
    same(answer.body, local(data))
    assert answer.body["categories"] == CATS
    assert set(answer.body["timings_ms"]) >= {"decode", "model", "postprocess", "encode", "total"}
    assert 1 <= answer.body["iterations"] <= BUDGET["max_iters"]


def test_checkpoint_round_trip_equals_cli_predict(server, artifacts, tmp_path):
    """The served checkpoint answers exactly what `crbp-deploy predict` writes, and `predict --url`
    writes the same files."""
    image = tmp_path / "scene.png"
    image.write_bytes(sample(2, 32, crop=(30, 27)))  # odd size: padded to the stride and cropped back
    local_dir, remote_dir = tmp_path / "local", tmp_path / "remote"
    r = cli("predict", str(image), "--model", str(artifacts["pt"]), "--out", str(local_dir))
    assert r.returncode == 0, r.stderr
    r = cli("predict", str(image), "--url", server["url"] + "tiny-pt", "--token", server["token"],
             "--out", str(remote_dir))
    assert r.returncode == 0, r.stderr
    mine = json.loads((local_dir / "scene_panoptic.json").read_text())
    theirs = json.loads((remote_dir / "scene_panoptic.json").read_text())
    for key in ("segments_info", "iterations", "residual", "converged", "categories"):
        assert theirs[key] == mine[key], key
    assert (remote_dir / "scene_panoptic.png").read_bytes() == (local_dir / "scene_panoptic.png").read_bytes()
    assert (remote_dir / "scene_overlay.png").read_bytes() == (local_dir / "scene_overlay.png").read_bytes()


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_4xx_json_and_server_keeps_serving(server, local, case):
    data, ctype, headers, status, words = BAD[case]
    good = sample(4, 32)
    answer = _post(server, "tiny", good if data is None else data, content_type=ctype, headers=headers)
    assert answer.status == status, answer.body
    assert answer.body["status"] == status and words in answer.body["message"], answer.body
    after = _post(server, "tiny", good)
    assert after.status == 200
    same(after.body, local(good))


def test_absurd_max_iters_names_the_limit(server):
    answer = _post(server, "tiny", sample(4, 32), max_iters=1000000)
    assert answer.status == 400 and "1..10000" in answer.body["message"] and "max_iters=50" in answer.body["message"]


def test_budget_headers_fields_and_clamp(server, local):
    data = sample(5, 32)
    fixed = _post(server, "tiny", data, max_iters=3, tol=0.0)  # tol 0: runs exactly the cap
    assert fixed.status == 200 and fixed.body["iterations"] == 3 and not fixed.body["converged"]
    same(fixed.body, local(data, max_iters=3, tol=0.0))
    clamped = _post(server, "tiny", data, max_iters=5000)
    assert clamped.status == 200
    assert clamped.body["budget"]["clamped"] and clamped.body["budget"]["max_iters"] == 50
    body, ctype = multipart({"data": (data, "image/png"), "max_iters": (b"4", None), "tol": (b"0", None)})
    form = _post(server, "tiny", body, content_type=ctype)
    assert form.status == 200 and form.body["iterations"] == 4
    body, ctype = multipart({"data": (data, "image/png"), "max_iter": (b"4", None)})
    typo = _post(server, "tiny", body, content_type=ctype)
    assert typo.status == 400 and "'max_iter'" in typo.body["message"]


def _hammer(server, jobs, clients):
    return hammer(server["url"] + "tiny", server["token"], jobs, clients)


def test_200_concurrent_requests_all_correct(server, local):
    """16 clients, 200 requests over 8 different images (2 sizes) and 2 budgets: every answer equals the
    unbatched local answer for its own image, and TorchServe did batch them."""
    images = [sample(10 + i, 32 if i % 2 else 40) for i in range(8)]
    budgets = [{}, {"max_iters": 12, "tol": 0.005}]
    expected = {(i, b): local(images[i], **budgets[b]) for i in range(8) for b in range(2)}
    assert len({e["panoptic_png"] for e in expected.values()}) >= 8  # different answers: a mix-up is visible
    assert len({e["residual"] for e in expected.values()}) == 16
    plan = [(k % 8, (k // 8) % 2) for k in range(200)]
    answers = _hammer(server, [(images[i], budgets[b]) for i, b in plan], clients=16)
    assert all(a is not None for a in answers)  # none lost
    for (i, b), answer in zip(plan, answers):
        assert answer.status == 200, answer.body
        same(answer.body, expected[(i, b)])  # none mixed up
    sizes = [a.body["batch_size"] for a in answers]
    assert max(sizes) > 1, "TorchServe never batched: the test did not exercise batching"


def test_bad_requests_inside_a_batch_fail_alone(server, local):
    good = [sample(30 + i, 32) for i in range(4)]
    jobs = [(good[k % 4], {}) if k % 3 else (b"not an image", {}) for k in range(24)]
    answers = _hammer(server, jobs, clients=12)
    for k, answer in enumerate(answers):
        if k % 3:
            assert answer.status == 200
            same(answer.body, local(good[k % 4]))
        else:
            assert answer.status == 400 and "not an image" in answer.body["message"]


def test_invocations_query_parameters(server):
    url = f"http://127.0.0.1:{server['port']}/invocations?model_name=tiny&max_iters=2&tol=0"
    with Client(url, token=server["token"]) as client:
        answer = client.post(sample(6, 32))
    assert answer.status == 200 and answer.body["iterations"] == 2
    assert answer.body["budget"]["requested"] == {"max_iters": 2, "tol": 0.0}


def test_a_diverging_state_is_never_converged_over_http(server):
    with Client(server["url"] + "tiny-nan", token=server["token"]) as client:
        answer = client.post(sample(3, 32))
    assert answer.status == 200, answer.body
    body = answer.body
    assert body["diverged"] is True and body["converged"] is False
    assert body["iterations"] == 1 and body["residual"] is None  # stopped at the first non-finite step
    assert body["segments_info"] == []  # a NaN state has nothing to segment


def test_metrics_on_prometheus_endpoint(server):
    url = f"http://127.0.0.1:{server['port'] + 2}/metrics"
    deadline = time.monotonic() + 20
    while True:
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        wanted = [
            '# TYPE IterationsToConverge histogram',
            'IterationsToConverge_count{ModelName="tiny"',
            'BudgetUsed_bucket{ModelName="tiny"',
            'NotConverged{ModelName="tiny"',
            'Diverged{ModelName="tiny-nan"',
            'StageLatency_bucket{ModelName="tiny",Stage="model"',
            'StageLatency_sum{ModelName="tiny",Stage="decode"',
        ]
        missing = [w for w in wanted if w not in text]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert not missing, missing
    count = next(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                 if line.startswith('IterationsToConverge_count{ModelName="tiny"'))
    assert count >= 200
    not_converged = next(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                         if line.startswith('NotConverged{ModelName="tiny"'))
    assert not_converged >= 1  # the tol=0 requests above never converge


def test_serve_stop_waits_for_java_exit(server):
    import psutil

    pid = server["pid"]
    proc = psutil.Process(pid)
    workers = proc.children(recursive=True)
    assert workers, "no worker processes found under the TorchServe Java process"
    r = cli("serve", "--stop", "--port", str(server["port"]), "--run-dir", str(server["run"]))
    assert r.returncode == 0 and "stopped" in r.stdout, r.stdout + r.stderr
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
    assert not (server["run"] / "key_file.json").exists()
    assert get_engine("torchserve").running(server["run"]) is None
    again = cli("serve", "--stop", "--port", str(server["port"]), "--run-dir", str(server["run"]))
    assert again.returncode == 0 and "no TorchServe" in again.stdout
