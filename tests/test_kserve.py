"""KServe manifests: structure of the InferenceService (TorchServe runtime, Open Inference Protocol v2)
and of the storage layout KServe's TorchServe runtime expects; then the same archive answering v2
requests through TorchServe's kservev2 envelope on a real local TorchServe."""
import json
import os
import shutil
import socket
import zipfile

import pytest
import torch
import yaml

from crbp_deploy import checkpoint
from crbp_deploy.data.panoptic_synth import CATEGORIES, generate_sample
from crbp_deploy.errors import InputError
from crbp_deploy.models import create_model
from crbp_deploy.serving.archive import ArchiveConfig, package
from crbp_deploy.serving.kserve import write_kserve
from crbp_deploy.serving.v2 import v2_answer, v2_request

TINY = {"encoder_channels": 8, "channels": 6, "kernel_size": 3, "head_channels": 8, "downsample": 1}
CATS = sorted(CATEGORIES, key=lambda c: c["id"])


def _props(text: str) -> dict:
    return dict(line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    pytest.importorskip("model_archiver", reason="torch-model-archiver is not installed")
    folder = tmp_path_factory.mktemp("k")
    torch.manual_seed(1)
    model = create_model("hgru-panoptic", num_classes=4, thing_classes=[0, 1], **TINY)
    meta = {"categories": CATS, "inference": {"budget": {"max_iters": 30, "tol": 1e-2}, "postprocess": {"min_area": 4}}}
    pt = checkpoint.save(model, folder / "tiny.pt", meta=meta)
    return package(pt, name="crbp-tiny", out=folder / "store", fmt="checkpoint", config=ArchiveConfig(batch_size=1)).path


def test_inference_service_structure(archive, tmp_path):
    bundle = write_kserve(archive, tmp_path / "kserve", storage_uri="gs://bucket/crbp-tiny", cpu="4", memory="8Gi")
    docs = list(yaml.safe_load_all(bundle.manifest.read_text()))
    assert len(docs) == 1
    isvc = docs[0]
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    assert isvc["kind"] == "InferenceService"
    assert isvc["metadata"]["name"] == "crbp-tiny"
    model = isvc["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "pytorch"  # KServe picks its TorchServe runtime for this format
    assert model["protocolVersion"] == "v2"
    assert model["storageUri"] == "gs://bucket/crbp-tiny"
    assert model["resources"]["requests"] == {"cpu": "4", "memory": "8Gi"}
    assert model["resources"]["limits"] == {"cpu": "4", "memory": "8Gi"}
    assert "image" not in model  # the runtime's own image unless one is given


def _closed(node):
    """The CRD's schema as `kubectl apply --validate=strict` reads it: unknown fields are errors (outside
    x-kubernetes-preserve-unknown-fields), int-or-string is either."""
    if isinstance(node, dict):
        if node.get("x-kubernetes-int-or-string"):
            node.pop("type", None)
            node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        if node.get("type") == "object" and "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            node.setdefault("additionalProperties", False)
        for value in node.values():
            _closed(value)
    elif isinstance(node, list):
        for value in node:
            _closed(value)
    return node


@pytest.mark.skipif(not os.environ.get("KSERVE_CRD"), reason=(
    "set KSERVE_CRD to KServe's config/crd/full/serving.kserve.io_inferenceservices.yaml: the kserve PyPI "
    "package ships neither the CRD nor its OpenAPI schema (checked: kserve 0.21.0)"))
def test_inference_service_against_the_kserve_crd():
    """The generated InferenceService against the real v1beta1 CRD schema; a typo must fail it."""
    jsonschema = pytest.importorskip("jsonschema")
    from crbp_deploy.serving.kserve import inference_service

    crd = yaml.safe_load(open(os.environ["KSERVE_CRD"]))
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1beta1")
    validator = jsonschema.Draft7Validator(_closed(version["schema"]["openAPIV3Schema"]))
    for options in ({}, {"gpus": 1}, {"image": "example/torchserve-onnx:1", "max_replicas": 8}):
        doc = inference_service("crbp-panoptic", "gs://bucket/crbp", **options)
        assert not [e.message for e in validator.iter_errors(doc)], options
    doc["spec"]["predictor"]["model"]["modelFormatt"] = {"name": "pytorch"}
    assert any("modelFormatt" in e.message for e in validator.iter_errors(doc))


def test_storage_layout_and_config_properties(archive, tmp_path):
    bundle = write_kserve(archive, tmp_path / "kserve")
    root = bundle.storage_dir
    assert (root / "config" / "config.properties").is_file()
    assert (root / "model-store" / "crbp-tiny.mar").is_file()
    with zipfile.ZipFile(root / "model-store" / "crbp-tiny.mar") as mar:
        names = set(mar.namelist())
        manifest = json.loads(mar.read("MAR-INF/MANIFEST.json"))
    assert {"panoptic_handler.py", "model-config.yaml", "crbp_deploy/serving/service.py", "crbp-tiny.pt"} <= names
    assert manifest["model"]["handler"] == "panoptic_handler.py"
    props = _props((root / "config" / "config.properties").read_text())
    assert props["enable_envvars_config"] == "true"  # KServe selects the v2 envelope through an env variable
    assert props["model_store"] == "/mnt/models/model-store"
    assert props["inference_address"] == "http://0.0.0.0:8085"
    assert props["metrics_mode"] == "prometheus"
    assert props["metrics_config"] == "/mnt/models/config/metrics.yaml"
    assert "IterationsToConverge" in (root / "config" / "metrics.yaml").read_text()
    snapshot = json.loads(props["model_snapshot"])
    assert snapshot["modelCount"] == 1
    entry = snapshot["models"]["crbp-tiny"]["1.0"]
    assert entry["marName"] == "crbp-tiny.mar" and entry["defaultVersion"] is True
    assert entry["batchSize"] == 1  # the kservev2 envelope reads only the first request of a batch
    assert bundle.storage_uri == "pvc://crbp-models/crbp-tiny"


def test_bad_names_and_archives(tmp_path):
    bad = tmp_path / "Crbp_Model.mar"
    bad.write_bytes(b"PK")
    with pytest.raises(InputError, match="InferenceService"):
        write_kserve(bad, tmp_path / "out")
    with pytest.raises(InputError, match="not a .mar"):
        write_kserve(tmp_path / "missing.mar", tmp_path / "out")


def test_cli_package_writes_kserve(archive, tmp_path):
    import subprocess
    import sys

    pt = archive.parent.parent / "tiny.pt"
    r = subprocess.run(
        [sys.executable, "-m", "crbp_deploy.cli", "package", str(pt), "--name", "crbp-cli", "--format", "checkpoint",
         "--out", str(tmp_path / "store"), "--kserve", str(tmp_path / "kserve"), "--storage-uri", "s3://b/crbp-cli",
         "--json"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["kserve"]["storage_uri"] == "s3://b/crbp-cli"
    isvc = yaml.safe_load((tmp_path / "kserve" / "inferenceservice.yaml").read_text())
    assert isvc["spec"]["predictor"]["model"]["storageUri"] == "s3://b/crbp-cli"
    assert doc["torchserve"]["batchSize"] == 8 and doc["torchserve"]["handler"]["max_iters_limit"] == 200


@pytest.mark.serve
def test_v2_protocol_on_real_torchserve(archive, tmp_path):
    """The archive answers Open Inference Protocol v2 requests (/v2/models/NAME/infer, a BYTES input)
    through TorchServe's kservev2 envelope, exactly as the service does in-process."""
    pytest.importorskip("ts", reason="torchserve is not installed")
    if not (shutil.which("java") or os.environ.get("JAVA_HOME")):
        pytest.skip("TorchServe needs Java 17")
    import io
    import urllib.error
    import urllib.request

    from PIL import Image

    from crbp_deploy.serving import server as ts
    from crbp_deploy.serving.service import PanopticService, RawRequest

    buf = io.BytesIO()
    Image.fromarray(generate_sample(3, seed=5, size=32)[0]).save(buf, format="PNG")
    image = buf.getvalue()
    port = next(p for p in range(30000 + os.getpid() % 20000, 65000, 7)
                if all(_free(q) for q in range(p, p + 5)))
    srv = ts.start(archive.parent, ts.ServerConfig(port=port, auth=False, envelope="kservev2"), run_dir=tmp_path / "run")
    try:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v2/models/crbp-tiny/infer", data=json.dumps(v2_request(image)).encode(),
            headers={"Content-Type": "application/json"}, method="POST",
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            doc = json.loads(response.read())
        tensor = {"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [0.5, 0.25]}]}
        bad = urllib.request.Request(
            f"http://127.0.0.1:{port}/v2/models/crbp-tiny/infer", data=json.dumps(tensor).encode(),
            headers={"Content-Type": "application/json"}, method="POST",
        )
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(bad, timeout=120)
        assert err.value.code == 400
        error = v2_answer(json.loads(err.value.read()))
        assert "datatype FP32" in error["message"] and "BYTES" in error["message"]
    finally:
        assert srv.stop()
    assert doc["model_name"] == "crbp-tiny" and doc["outputs"][0]["datatype"] == "BYTES"
    served = v2_answer(doc)
    local = PanopticService(archive.parent.parent / "tiny.pt").handle([RawRequest({"body": image}, {"body": "image/png"})])[0]
    mine = json.loads(local.json())
    for key in ("segments_info", "panoptic_png", "iterations", "residual", "converged"):
        assert served[key] == mine[key], key


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
