"""The Triton engine: the model repository `package --format triton` writes, its KServe manifest against the
shipped CRD schema, the one-line refusals (missing server files, a port in use), the in-process
ScheduledService under overload; then one real `tritonserver` (module fixture) answering the serving
tests' requests as the request-level service does, a plain tritonclient call, the key, and answers that do
not depend on who else was in the batch.

The server tests are skipped where the nvidia-pytriton wheel is not installed (`make setup`).
"""
import concurrent.futures
import json
import re
import shutil
import socket

import numpy as np
import pytest

from crbp_deploy.errors import CrbpError, InputError
from crbp_deploy.serving.client import Client
from crbp_deploy.serving.service import PanopticService, RawRequest
from serving_util import BAD, BUDGET, CATS, TINY, cli, free_ports, sample, served

pytestmark = pytest.mark.timeout(600)
VARYING = ("timings_ms", "batch_size")  # how long it took and what it shared the steps with


def _one_line(r, words):
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], r.stderr


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """The tiny model of the serving tests packaged for Triton (exported once, to ONNX with its pieces)."""
    import torch

    from crbp_deploy import checkpoint
    from crbp_deploy.models import create_model

    folder, out = tmp_path_factory.mktemp("models"), tmp_path_factory.mktemp("repo")
    torch.manual_seed(1)
    model = create_model("hgru-panoptic", num_classes=4, thing_classes=[0, 1], **TINY)
    meta = {"categories": CATS, "inference": {"budget": BUDGET, "postprocess": {"min_area": 4}}}
    pt = checkpoint.save(model, folder / "tiny.pt", meta=meta)
    r = cli("package", pt, "--format", "triton", "--name", "tiny", "--out", out, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    return {"path": out, "result": json.loads(r.stdout), "onnx": out / "tiny" / "1" / "tiny.onnx", "folder": folder}


def test_repository_layout(repo):
    from crbp_deploy.serving.scheduled import SchedulerConfig
    from crbp_deploy.serving.service import ServiceConfig

    assert repo["result"]["format"] == "triton" and repo["result"]["model_file"] == "tiny.onnx"
    files = set(repo["result"]["files"])
    assert {"config.pbtxt", "1/model.py", "1/tiny.onnx", "1/tiny.onnx.json", "1/tiny.onnx.pieces/pieces.json"} <= files
    assert (repo["path"] / "tiny" / "1" / "crbp_deploy" / "serving" / "triton_model.py").is_file()  # the packaged code
    text = (repo["path"] / "tiny" / "config.pbtxt").read_text()
    assert 'backend: "python"' in text and 'name: "IMAGE" data_type: TYPE_UINT8' in text
    assert 'name: "ANSWER" data_type: TYPE_UINT8' in text
    quoted = r'"(?:[^"\\]|\\.)*"'
    params = {json.loads(k): json.loads(v) for k, v in
              re.findall(rf"\{{ key: ({quoted}) value: \{{ string_value: ({quoted}) \}} \}}", text)}
    assert params["artifact"] == "tiny.onnx" and "UINT8" in params["io"]
    assert ServiceConfig.from_dict(json.loads(params["service"])) == ServiceConfig()
    assert SchedulerConfig.from_dict(json.loads(params["scheduler"])).mode == "iteration"


def test_package_refuses_an_onnx_without_pieces(repo, tmp_path):
    from crbp_deploy.serving.triton_model import package_triton

    for name in ("tiny.onnx", "tiny.onnx.json"):  # the export without its pieces
        shutil.copy2(repo["onnx"].with_name(name), tmp_path / name)
    with pytest.raises(InputError, match="has no pieces"):
        package_triton(tmp_path / "tiny.onnx", name="tiny", out=tmp_path / "repo")


def test_kserve_manifest_follows_the_crd(repo, tmp_path):
    import yaml

    from crbp_deploy.serving.kserve import write_triton_kserve
    from test_kserve import SHIPPED_SCHEMA, _errors, crd_validator

    bundle = write_triton_kserve(repo["path"], "tiny", tmp_path / "kserve", image="registry/crbp-triton:1")
    doc = yaml.safe_load(bundle.manifest.read_text())
    assert _errors(crd_validator(json.loads(SHIPPED_SCHEMA.read_text())), doc) == []
    model = doc["spec"]["predictor"]["model"]
    assert model["modelFormat"] == {"name": "triton"} and model["runtime"] == "kserve-tritonserver"
    assert (bundle.storage_dir / "tiny" / "config.pbtxt").is_file()


def test_missing_server_files_name_the_install_step(tmp_path):
    fake = tmp_path / "shadow" / "pytriton"  # a pytriton without the server files shadows the real one
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (tmp_path / "repo" / "tiny").mkdir(parents=True)
    r = cli("serve", "--engine", "triton", "--model-store", tmp_path / "repo", "--port", free_ports(3),
            "--run-dir", tmp_path / "run", env={"PYTHONPATH": str(tmp_path / "shadow")})
    _one_line(r, "pip install --no-deps nvidia-pytriton==0.7.0")


def test_refusals_before_starting(repo, tmp_path):
    from crbp_deploy.serving.engine import get_engine
    from crbp_deploy.serving.triton_engine import wheel_files

    try:
        wheel_files()
    except CrbpError:
        pytest.skip("nvidia-pytriton is not installed (make setup)")
    port = free_ports(3)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port + 1))
        busy.listen()
        r = cli("serve", "--engine", "triton", "--model-store", repo["path"], "--port", port, "--run-dir", tmp_path)
    _one_line(r, f"port(s) in use on 127.0.0.1: grpc {port + 1}")
    _one_line(cli("serve", "--engine", "triton", "--model-store", tmp_path / "none", "--port", port, "--run-dir", tmp_path),
              "Triton model repository")
    with pytest.raises(CrbpError, match="--replicas is for --engine ray"):
        get_engine("triton").configure(port, replicas=2)


def test_overload_is_refused_with_retry_after_never_dropped(repo):
    """A full queue answers 503 with Retry-After at once; every request gets exactly one answer."""
    from crbp_deploy.serving.scheduled import ScheduledService, SchedulerConfig

    service = PanopticService(repo["onnx"])
    scheduled = ScheduledService(service, SchedulerConfig(slots=1, max_queue=2))
    try:  # submitted before the tick thread runs: two wait, the rest find the queue full
        pending = [scheduled.submit(RawRequest({"body": sample(i, 32)})) for i in range(6)]
        scheduled.start()
        replies = [f.result(60) for f in pending]
    finally:
        scheduled.stop()
    assert [r.status for r in replies] == [200, 200, 503, 503, 503, 503]
    refused = next(r for r in replies if r.status == 503)
    assert int(refused.headers["Retry-After"]) >= 1 and "queue is full" in refused.body["message"]


# --- a real tritonserver --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def triton(repo, tmp_path_factory):
    from crbp_deploy.serving.triton_engine import wheel_files

    try:
        wheel_files()
    except CrbpError:
        pytest.skip("nvidia-pytriton is not installed (make setup)")
    with served(repo["path"], tmp_path_factory.mktemp("triton"), engine="triton") as info:
        info["infer"] = f"http://127.0.0.1:{info['port']}/v2/models/tiny/infer"
        yield info


def _requests():
    """(name, image bytes, headers): good requests with budgets, and every refusal of the serving tests."""
    image = sample(80, 32)
    out = [("raw", image, {}), ("budget headers", image, {"X-Max-Iters": "4", "X-Tol": "0"}),
           ("clamped", sample(81, 40), {"X-Max-Iters": "5000"}), ("odd size", sample(82, 40, crop=(37, 29)), {})]
    return out + [(name, image if data is None else data, headers) for name, (data, _, headers, _, _) in BAD.items()]


@pytest.mark.serve
def test_answers_as_the_request_level_service(triton, repo):
    """Every request of the serving tests gets the answer PanopticService.handle gives (what TorchServe's
    handler runs): the same status and JSON for refusals, the same iterations and segments for answers."""
    service = PanopticService(repo["onnx"])
    statuses = set()
    with Client(triton["infer"], token=triton["token"], timeout=60) as client:
        for name, data, headers in _requests():
            got = client.post(data, headers=headers)
            want = service.handle([RawRequest({"body": data}, {"body": ""}, headers)])[0]
            assert got.body.get("status", 200) == want.status, (name, got.body)
            assert (got.status >= 400) == (want.status >= 400), name
            body = {k: v for k, v in got.body.items() if k not in VARYING}
            expected = {k: v for k, v in want.body.items() if k not in VARYING}
            if want.status != 200:
                assert body == expected, name
            else:
                _close(body, expected, name)
            statuses.add(want.status)
    assert statuses >= {200, 400}  # no 415: a v2 request carries no content type for the image


def _close(got: dict, want: dict, name: str) -> None:
    """Same answer within the export tolerance: equal iterations, stop, segments and id map; residual close."""
    for key in ("iterations", "stopped", "size", "converged", "panoptic_png", "categories", "budget"):
        assert got[key] == want[key], (name, key)
    assert got["residual"] == pytest.approx(want["residual"], rel=1e-4, abs=1e-6), name
    strip = lambda segs: [{k: v for k, v in s.items() if k != "score"} for s in segs]  # noqa: E731
    assert strip(got["segments_info"]) == strip(want["segments_info"]), name
    assert [s["score"] for s in got["segments_info"]] == pytest.approx([s["score"] for s in want["segments_info"]], abs=1e-4)


@pytest.mark.serve
def test_plain_tritonclient_knowing_only_the_metadata(triton):
    http = pytest.importorskip("tritonclient.http", reason="tritonclient is not installed (pip install 'crbp-deploy[dev]')")
    auth = {"Authorization": f"Bearer {triton['token']}"}
    client = http.InferenceServerClient(f"127.0.0.1:{triton['port']}")
    meta = client.get_model_metadata("tiny", headers=auth)
    (inp,), (out,) = meta["inputs"], meta["outputs"]
    image = np.frombuffer(sample(80, 32), dtype=np.uint8)
    tensor = http.InferInput(inp["name"], [len(image)], inp["datatype"])
    tensor.set_data_from_numpy(image)
    result = client.infer("tiny", [tensor], headers=auth, parameters={"max_iters": 5})
    answer = json.loads(result.as_numpy(out["name"]).tobytes())
    assert answer["model"] == "tiny" and answer["iterations"] <= 5 and answer["budget"]["requested"] == {"max_iters": 5}
    with Client(triton["infer"], token=triton["token"]) as ours:
        same = ours.post(sample(80, 32), max_iters=5).body
    _close({k: v for k, v in answer.items() if k not in VARYING}, {k: v for k, v in same.items() if k not in VARYING}, "tritonclient")


@pytest.mark.serve
def test_predict_url_against_triton(triton, tmp_path):
    """`crbp-deploy predict --url` on the v2 endpoint writes the usual files (the key through --token: the
    server's run folder is not the default one, where predict would find it)."""
    (tmp_path / "scene.png").write_bytes(sample(80, 32))
    r = cli("predict", tmp_path / "scene.png", "--url", triton["infer"], "--token", triton["token"], "--max-iters", "6",
            "--out", tmp_path / "out")
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads((tmp_path / "out" / "scene_panoptic.json").read_text())
    assert doc["iterations"] <= 6 and (tmp_path / "out" / "scene_panoptic.png").is_file()


@pytest.mark.serve
def test_the_key_is_required_and_the_repository_api_is_closed(triton):
    from crbp_deploy.serving.engine import http_get

    base = f"http://127.0.0.1:{triton['port']}"
    assert "key_file.json" in triton["stdout"]
    for token in (None, "wrong"):
        with Client(triton["infer"], token=token) as client:
            refused = client.post(sample(80, 32))
        assert refused.status == 403 and "restricted" in refused.body["message"]
        assert http_get(f"{base}/v2/health/ready", token)[0] == 403
    assert http_get(f"{base}/v2/health/ready", triton["token"])[0] == 200
    import urllib.request

    unload = urllib.request.Request(f"{base}/v2/repository/models/tiny/unload", data=b"{}", method="POST",
                                    headers={"Authorization": f"Bearer {triton['token']}"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(unload, timeout=10)
    assert err.value.code == 403
    with Client(triton["infer"], token=triton["token"]) as client:
        assert client.post(sample(80, 32)).status == 200  # still loaded


@pytest.mark.serve
def test_grpc_needs_the_key_too(triton):
    grpc = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] (grpcio) is not installed")
    from tritonclient.utils import InferenceServerException

    client = grpc.InferenceServerClient(f"127.0.0.1:{triton['port'] + 1}")
    image = np.frombuffer(sample(80, 32), dtype=np.uint8)
    tensor = grpc.InferInput("IMAGE", [len(image)], "UINT8")
    tensor.set_data_from_numpy(image)
    with pytest.raises(InferenceServerException, match="restricted"):
        client.infer("tiny", [tensor])
    with pytest.raises(InferenceServerException, match="restricted"):  # Triton wants its prefixed name on gRPC
        client.infer("tiny", [tensor], headers={"authorization": f"Bearer {triton['token']}"})
    result = client.infer("tiny", [tensor], headers={"triton-grpc-protocol-authorization": f"Bearer {triton['token']}"})
    assert json.loads(result.as_numpy("ANSWER").tobytes())["model"] == "tiny"


@pytest.mark.serve
def test_answers_do_not_depend_on_who_else_ran(triton):
    """Easy and hard scenes of two sizes sent together (joining and leaving between steps) get their solo
    answers: identical iterations, outputs within tolerance."""
    jobs = [(sample(90 + i, 32 if i % 3 else 40), {"X-Max-Iters": str(3 + 7 * (i % 4))}) for i in range(12)]

    def ask(job):
        with Client(triton["infer"], token=triton["token"], timeout=120) as client:
            return client.post(job[0], headers=job[1]).body

    solo = [ask(job) for job in jobs]
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        together = list(pool.map(ask, jobs))
    for i, (a, b) in enumerate(zip(together, solo)):
        _close({k: v for k, v in a.items() if k not in VARYING}, {k: v for k, v in b.items() if k not in VARYING}, str(i))
    assert len({a["iterations"] for a in together}) > 2  # a real mix of easy and hard


@pytest.mark.serve
def test_serve_stop_ends_every_process(triton):
    from crbp_deploy.serving.engine import get_engine, is_loopback

    engine = get_engine("triton")
    assert engine.running(triton["run"]) == triton["pid"]
    assert len(engine.processes(triton["run"])) >= 2  # the server and its model's stub
    sockets = engine.listening(triton["run"])
    assert {port for _, port, *_ in sockets} == {triton["port"] + i for i in range(3)}  # HTTP, gRPC, metrics
    assert all(is_loopback(ip) for ip, *_ in sockets), sockets  # gRPC shows as ::ffff:127.0.0.1
    r = cli("serve", "--stop", "--engine", "triton", "--port", triton["port"], "--run-dir", triton["run"])
    assert r.returncode == 0 and "stopped Triton" in r.stdout, r.stdout + r.stderr
    assert engine.running(triton["run"]) is None and engine.processes(triton["run"]) == []
    assert not (triton["run"] / "key_file.json").exists()
