"""The engines behind one `Engine` interface: the registry and the checks every engine shares; then the
same archive on both engines: TorchServe and Ray Serve answer every request alike (same status, same JSON
but timings), and the Ray engine's own parts: a real local Ray cluster started and stopped by
`crbp-deploy serve --engine ray`, batching, the generated cluster configs, and its bad inputs.

The Ray tests are skipped where Ray Serve is not installed (`pip install 'crbp-deploy[ray]'`, part of
`make setup`).
"""
import json
import socket

import psutil
import pytest
import yaml

from crbp_deploy.errors import CrbpError, InputError
from crbp_deploy.serving.client import Client
from crbp_deploy.serving.engine import ENGINES, Engine, get_engine
from serving_util import BAD, cli, free_ports, hammer, multipart, sample, served, tiny_store

pytestmark = [pytest.mark.serve, pytest.mark.timeout(900)]
VARYING = ("timings_ms", "batch_size")  # how long it took and what it was batched with


def _one_line(r, words):
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], r.stderr


# --- the interface, without a server ---------------------------------------------------------------


def test_registry_names_every_engine(tmp_path, monkeypatch):
    monkeypatch.setenv("CRBP_DEPLOY_STATE", str(tmp_path))
    for name in ENGINES:
        engine = get_engine(name)
        assert isinstance(engine, Engine) and engine.name == name
        assert engine.default_run_dir(8123) == tmp_path / f"{name}-8123"
        assert engine.running(tmp_path) is None and engine.stop(tmp_path) is False  # nothing started there
    with pytest.raises(InputError, match="must be one of torchserve, ray, triton, got 'tgi'"):
        get_engine("tgi")


def test_check_installed_names_the_missing_package():
    engine = get_engine("torchserve")
    engine.requires = (("yaml", "pyyaml"), ("crbp_no_such_module", "no-such-package"))
    with pytest.raises(CrbpError, match=r"^serving needs no-such-package: pip install 'crbp-deploy\[serve\]'$"):
        engine.check_installed()


def test_every_engine_refuses_before_starting_anything(tmp_path):
    """A missing store, an empty store, an archive not in the store and a busy port are refused with the
    same words by every engine, before a process is started."""
    installed = []
    for name in ENGINES:
        try:
            get_engine(name).check_installed()
            installed.append(name)
        except CrbpError:
            continue
    if not installed:
        pytest.skip("no serving engine is installed")
    empty, store = tmp_path / "empty", tmp_path / "store"
    empty.mkdir()
    store.mkdir()
    (store / "tiny.mar").write_bytes(b"")  # only the name is looked at before the ports are checked
    (store / "tiny").mkdir()
    (store / "tiny" / "config.pbtxt").write_text("")  # the same for a Triton repository
    port = free_ports(10)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        for name in installed:
            engine, run = get_engine(name), tmp_path / name
            config = engine.configure(port)
            first = next(iter(config.ports()))  # the inference port's name
            for model_store, models, words in [(tmp_path / "none", None, "does not exist"),
                                               (empty, None, "no .mar archives" if name != "triton" else "no models"),
                                               (store, ["other"], "not in"),
                                               (store, None, f"port(s) in use on 127.0.0.1: {first} {port}")]:
                with pytest.raises(CrbpError) as err:
                    engine.start(model_store, config, run_dir=run, models=models)
                assert words in str(err.value), (name, str(err.value))
            assert engine.running(run) is None and not (run / "key_file.json").exists()


def test_serve_engine_options_are_checked():
    _one_line(cli("serve", "--engine", "tgi", "--port", free_ports(10)), "--engine must be one of torchserve, ray, triton")
    _one_line(cli("serve", "--replicas", "2", "--port", free_ports(10)), "--replicas is for --engine ray")


# --- both engines, running -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tiny_store(tmp_path_factory, max_batch_delay_ms=20)


@pytest.fixture(scope="module")
def torchserve(store, tmp_path_factory):
    with served(store["path"], tmp_path_factory.mktemp("ts")) as info:
        yield info


@pytest.fixture(scope="module")
def rayserve(store, tmp_path_factory):
    """`crbp-deploy serve --engine ray --replicas 2`; `serve --stop` at the end, even on failure."""
    pytest.importorskip("ray", reason="Ray Serve is not installed (pip install 'crbp-deploy[ray]')")
    with served(store["path"], tmp_path_factory.mktemp("ray"), "--replicas", "2", engine="ray", timeout=400) as info:
        yield info


def _requests():
    """(name, path, body, content type, headers) covering every request format and every refusal."""
    image = sample(80, 32)
    form = multipart({"data": (image, "image/png"), "max_iters": (b"4", None), "tol": (b"0", None)})
    typo = multipart({"data": (image, "image/png"), "max_iter": (b"4", None)})
    out = [("raw body", "predictions/tiny", image, "image/png", {}),
           ("budget headers", "predictions/tiny", image, "image/png", {"X-Max-Iters": "4", "X-Tol": "0"}),
           ("clamped", "predictions/tiny", sample(81, 40), "image/png", {"X-Max-Iters": "5000"}),
           ("invocations", "invocations?model_name=tiny&max_iters=3&tol=0", image, "image/png", {}),
           ("invocations, unknown parameter", "invocations?model_name=tiny&colour=red", image, "image/png", {}),
           ("unknown model", "predictions/nope", image, "image/png", {}),
           ("multipart", "predictions/tiny", *form, {}),
           ("multipart, typo", "predictions/tiny", *typo, {}),
           ("budget twice, different", "predictions/tiny", *form, {"X-Max-Iters": "5"})]
    for name, (data, ctype, headers, _, _) in BAD.items():
        out.append((name, "predictions/tiny", image if data is None else data, ctype, headers))
    return out


def _ask(base, token, path, body, ctype, headers):
    with Client(f"{base}/{path}", token=token, timeout=60) as client:
        answer = client.post(body, content_type=ctype, headers=headers)
    return answer.status, {k: v for k, v in answer.body.items() if k not in VARYING}


def test_both_engines_answer_alike(torchserve, rayserve):
    statuses = set()
    for name, path, body, ctype, headers in _requests():
        ts = _ask(f"http://127.0.0.1:{torchserve['port']}", torchserve["token"], path, body, ctype, headers)
        rs = _ask(f"http://127.0.0.1:{rayserve['port']}", rayserve["token"], path, body, ctype, headers)
        assert rs == ts, name
        statuses.add(rs[0])
    assert statuses >= {200, 400, 404, 415}
    padded = [_ask(f"http://127.0.0.1:{srv['port']}", srv["token"], "predictions/tiny", sample(80, 32), "image/png",
                   {"X-Pad": "a" * 9000})[0] for srv in (torchserve, rayserve)]
    assert padded == [400, 400]  # more than TorchServe's 8 KiB of headers
    wrong = [_ask(f"http://127.0.0.1:{srv['port']}", "wrong", "predictions/tiny", sample(80, 32), "image/png", {})
             for srv in (torchserve, rayserve)]
    assert wrong[0] == wrong[1] and wrong[0][0] == 400


def test_ray_batches_by_budget_and_size(rayserve, store):
    """48 requests from 16 clients over 2 sizes and 2 budgets on 2 replicas: every answer is the
    one-at-a-time in-process answer for its own image and budget, and batches were formed."""
    from crbp_deploy.serving.service import PanopticService, RawRequest

    service = PanopticService(store["onnx"])
    images = [sample(90 + i, 32 if i % 2 else 40) for i in range(4)]
    budgets = [{}, {"max_iters": 12, "tol": 0.005}]
    expected = {}
    for i, im in enumerate(images):
        for b, budget in enumerate(budgets):
            headers = {f"X-{k.replace('_', '-')}": str(v) for k, v in budget.items()}
            expected[(i, b)] = json.loads(service.handle([RawRequest({"body": im}, {"body": "image/png"}, headers)])[0].json())
    plan = [(k % 4, (k // 4) % 2) for k in range(48)]
    answers = hammer(rayserve["url"] + "tiny", rayserve["token"], [(images[i], budgets[b]) for i, b in plan], clients=16)
    for (i, b), answer in zip(plan, answers):
        assert answer.status == 200, answer.body
        assert {k: v for k, v in answer.body.items() if k not in VARYING} == \
               {k: v for k, v in expected[(i, b)].items() if k not in VARYING}
    assert max(a.body["batch_size"] for a in answers) > 1, "Ray Serve never batched"


def test_cluster_configs_follow_ray_schema(rayserve):
    from ray.serve.schema import ServeDeploySchema

    out = rayserve["stdout"]
    assert "serve_config.yaml" in out and "rayservice.yaml" in out and "networkpolicy.yaml" in out
    config = yaml.safe_load((rayserve["run"] / "serve_config.yaml").read_text())
    ServeDeploySchema.model_validate(config)  # Ray's own schema for `serve deploy`
    app = config["applications"][0]
    assert app["import_path"] == "crbp_deploy.serving.ray_app:build_app"
    scaling = app["args"]["autoscaling_config"]
    assert scaling["min_replicas"] == 1 and scaling["initial_replicas"] == 2 and scaling["max_replicas"] == 8
    service = yaml.safe_load((rayserve["run"] / "rayservice.yaml").read_text())
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    assert yaml.safe_load(service["spec"]["serveConfigV2"]) == config
    assert service["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "token"}
    policy = yaml.safe_load((rayserve["run"] / "networkpolicy.yaml").read_text())
    assert policy["kind"] == "NetworkPolicy"  # what it opens: tests/test_lockdown.py


def test_ray_bad_inputs(rayserve, tmp_path):
    """--replicas 0, Ray missing, a port in use: one clear line, exit 1."""
    _one_line(cli("serve", "--engine", "ray", "--replicas", "0", "--port", free_ports(10)), "--replicas must be at least 1")
    shadow = tmp_path / "noray" / "ray"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    _one_line(cli("serve", "--engine", "ray", "--port", free_ports(10), env={"PYTHONPATH": str(shadow.parent)}),
             "pip install 'crbp-deploy[ray]'")
    store = yaml.safe_load((rayserve["run"] / "serve_config.yaml").read_text())["applications"][0]["args"]["model_store"]
    _one_line(cli("serve", "--engine", "ray", "--model-store", store, "--port", rayserve["port"],
                 "--run-dir", tmp_path / "second"), "port(s) in use")


def test_serve_stop_ends_the_cluster(rayserve):
    from crbp_deploy.serving.ray_engine import _cluster_processes

    procs = _cluster_processes(rayserve["run"])
    assert len(procs) >= 3  # GCS, raylet, Serve controller / proxy / replicas
    assert rayserve["pid"] in {p.pid for p in procs}  # what the Engine reports as running
    r = cli("serve", "--stop", "--port", rayserve["port"], "--run-dir", rayserve["run"])
    assert r.returncode == 0 and "stopped the Ray cluster" in r.stdout, r.stdout + r.stderr
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in procs)
    assert not _cluster_processes(rayserve["run"]) and not (rayserve["run"] / "key_file.json").exists()
    assert get_engine("ray").running(rayserve["run"]) is None
    again = cli("serve", "--stop", "--port", rayserve["port"], "--run-dir", rayserve["run"])
    assert again.returncode == 0 and "no TorchServe" in again.stdout


def test_ray_temp_dir_fits_unix_sockets(tmp_path):
    """Ray binds Unix sockets ~60 characters below its temp dir (107 at most): a long run folder gets a
    short, stable temp dir elsewhere, which `stop` derives the same way."""
    from crbp_deploy.serving.ray_engine import temp_dir

    deep = tmp_path / ("a" * 80) / "ray-8000"
    assert len(str(temp_dir(deep))) <= 45 and temp_dir(deep) == temp_dir(deep)
    assert temp_dir(deep) != temp_dir(tmp_path / ("b" * 80) / "ray-8000")
    assert temp_dir(tmp_path) == tmp_path / "ray" or len(str(tmp_path / "ray")) > 45
