"""KServe manifests: the InferenceService (TorchServe runtime, Open Inference Protocol v2), validated
against KServe's real v1beta1 CRD schema (tests/data/kserve, from KServe v0.20.0; KSERVE_CRD=path/to/
serving.kserve.io_inferenceservices.yaml adds another release's), and the storage layout KServe's
TorchServe runtime expects; then the same archive answering v2 requests through TorchServe's kservev2
envelope on a real local TorchServe."""
import json
import os
import shutil
import socket
import zipfile
from pathlib import Path

import jsonschema
import pytest
import torch
import yaml

from crbp_deploy import checkpoint
from crbp_deploy.data.panoptic_synth import CATEGORIES, generate_sample
from crbp_deploy.errors import InputError
from crbp_deploy.models import create_model
from crbp_deploy.serving.archive import ArchiveConfig, package
from crbp_deploy.serving.kserve import API_VERSION, KIND, inference_service, write_kserve
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
    # the file as written, against KServe's v1beta1 CRD schema (more options below)
    assert _errors(crd_validator(json.loads(SHIPPED_SCHEMA.read_text())), isvc) == []


# KServe's InferenceService CRD, v1beta1 schema, from KServe v0.20.0 (tests/data/kserve/README.md).
SHIPPED_SCHEMA = Path(__file__).parent / "data" / "kserve" / "inferenceservice-v1beta1.schema.json"

# The CRD says only `metadata: {type: object}`: the API server validates ObjectMeta itself. The part of
# it these manifests use, with Kubernetes' rules (name: DNS-1123 subdomain; label keys and values).
_DNS1123 = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_LABELS = {  # draft 4 has no propertyNames: keys through patternProperties, nothing else allowed
    "type": "object",
    "patternProperties": {rf"^({_DNS1123}(\.{_DNS1123})*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{{0,61}}[A-Za-z0-9])?$": {
        "type": "string", "maxLength": 63, "pattern": r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"}},
    "additionalProperties": False,
}
OBJECT_META = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "maxLength": 253, "pattern": rf"^{_DNS1123}(\.{_DNS1123})*$"},
        "namespace": {"type": "string", "maxLength": 63, "pattern": rf"^{_DNS1123}$"},
        "labels": _LABELS,
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


def _structural(node):
    """A CRD structural schema as the API server applies it under `kubectl apply` (field validation
    `strict`, kubectl's default): an object with `properties` rejects unknown fields unless it is marked
    x-kubernetes-preserve-unknown-fields; x-kubernetes-int-or-string takes an integer or a string;
    `nullable` admits null. x-kubernetes-list-type is checked by the validator below."""
    if isinstance(node, dict):
        node = dict(node)
        for key, value in list(node.items()):
            if key in ("properties", "patternProperties"):
                node[key] = {name: _structural(sub) for name, sub in value.items()}
            elif isinstance(value, (dict, list)) and key not in ("default", "enum", "example"):  # data, not schemas
                node[key] = _structural(value)
        if node.get("x-kubernetes-int-or-string"):
            node.pop("type", None)
            node.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
        if node.get("nullable") and "type" in node:
            node["type"] = [node["type"], "null"]
        if (node.get("type") == "object" and "properties" in node and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")):
            node["additionalProperties"] = False
        return node
    if isinstance(node, list):
        return [_structural(value) for value in node]
    return node


def _list_type(validator, kind, instance, schema):
    """x-kubernetes-list-type: `set` items are unique; `map` items are unique by x-kubernetes-list-map-keys
    (the API server answers `Duplicate value`); `atomic` constrains nothing."""
    if not validator.is_type(instance, "array") or kind not in ("set", "map"):
        return
    keys = schema.get("x-kubernetes-list-map-keys", [])
    seen = set()
    for item in instance:
        what = {k: item.get(k) for k in keys} if kind == "map" and isinstance(item, dict) else item
        key = json.dumps(what, sort_keys=True)
        if key in seen:
            yield jsonschema.ValidationError(f"duplicate entry {what!r} in a list-type {kind}")
        seen.add(key)


def crd_validator(schema_doc: dict):
    """A validator for one CRD version's openAPIV3Schema (OpenAPI v3.0 schemas are JSON Schema draft 4
    in its keywords), closed as above, with ObjectMeta checked at the root and apiVersion/kind fixed."""
    schema = _structural(schema_doc["openAPIV3Schema"])
    schema["properties"] = {**schema["properties"], "metadata": OBJECT_META,
                            "apiVersion": {"type": "string", "enum": [schema_doc["apiVersion"]]},
                            "kind": {"type": "string", "enum": [schema_doc["kind"]]}}
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata"})
    cls = jsonschema.validators.extend(jsonschema.Draft4Validator, {"x-kubernetes-list-type": _list_type})
    cls.check_schema(schema)
    return cls(schema)


def _schema_from_crd(path: str, version: str = "v1beta1") -> dict:
    crd = yaml.safe_load(open(path))
    served = next(v for v in crd["spec"]["versions"] if v["name"] == version)
    return {"apiVersion": f"{crd['spec']['group']}/{version}", "kind": crd["spec"]["names"]["kind"],
            "openAPIV3Schema": served["schema"]["openAPIV3Schema"], "source": {"path": path}}


def _schemas():
    yield pytest.param(json.loads(SHIPPED_SCHEMA.read_text()), id="kserve-v0.20.0")
    if os.environ.get("KSERVE_CRD"):  # also a CRD of the user's choice (another KServe release)
        yield pytest.param(_schema_from_crd(os.environ["KSERVE_CRD"]), id="KSERVE_CRD")


@pytest.fixture(scope="module", params=list(_schemas()))
def isvc_validator(request):
    return crd_validator(request.param)


def _errors(validator, doc) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def test_shipped_schema_source():
    doc = json.loads(SHIPPED_SCHEMA.read_text())
    assert doc["source"]["repository"] == "https://github.com/kserve/kserve" and doc["source"]["tag"] == "v0.20.0"
    assert doc["apiVersion"] == API_VERSION and doc["kind"] == KIND
    assert (SHIPPED_SCHEMA.parent / "LICENSE").read_text().startswith(" " * 33 + "Apache License")
    assert SHIPPED_SCHEMA.stat().st_size < 1_000_000


@pytest.mark.parametrize("options", [
    {}, {"gpus": 1}, {"image": "example/torchserve-onnx:1", "max_replicas": 8, "min_replicas": 0},
    {"cpu": "500m", "memory": "512Mi", "threads": 2},
])
def test_inference_service_against_the_kserve_crd(isvc_validator, options):
    """The generated InferenceService against KServe's real v1beta1 CRD schema."""
    doc = inference_service("crbp-panoptic", "gs://bucket/crbp", **options)
    assert _errors(isvc_validator, doc) == []
    assert _errors(isvc_validator, yaml.safe_load(yaml.safe_dump(doc, sort_keys=False))) == []


DELETE = object()


def _broken(path: str, value):
    doc = inference_service("crbp-panoptic", "gs://bucket/crbp")
    *parents, last = path.split(".")
    node = doc
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return doc


@pytest.mark.parametrize("path, value, expected", [
    ("spec.predictor.minReplicas", "two", "spec.predictor.minReplicas: 'two' is not of type 'integer'"),
    ("spec.predictor.maxReplicas", True, "spec.predictor.maxReplicas: True is not of type 'integer'"),
    ("spec.predictor.model.modelFormatt", {"name": "pytorch"}, "'modelFormatt' was unexpected"),
    ("spec.predictr", {}, "'predictr' was unexpected"),
    ("spec.predictor.model.modelFormat.name", DELETE,
     "spec.predictor.model.modelFormat: 'name' is a required property"),
    ("spec.predictor.model.resources.limits.memory", "8GB",  # a quantity is 8Gi or 8G
     "spec.predictor.model.resources.limits.memory: '8GB' does not match"),
    ("spec.predictor.model.env", [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}],
     "spec.predictor.model.env: duplicate entry {'name': 'A'} in a list-type map"),
    ("spec.predictor.model.env", [{"value": "1"}], "spec.predictor.model.env.0: 'name' is a required property"),
    ("spec.predictor.model.env.0.value", 1, "spec.predictor.model.env.0.value: 1 is not of type 'string'"),
    ("metadata.labels.app", 1, "metadata.labels.app: 1 is not of type 'string'"),
    ("metadata.labels.bad key!", "x", "metadata.labels: 'bad key!' does not match any of the regexes"),
    ("metadata.name", "Crbp_Model", "metadata.name: 'Crbp_Model' does not match"),
    ("apiVersion", "serving.kserve.io/v1alpha1", "apiVersion: 'serving.kserve.io/v1alpha1' is not one of"),
])
def test_the_crd_schema_rejects_broken_manifests(isvc_validator, path, value, expected):
    errors = _errors(isvc_validator, _broken(path, value))
    assert any(e.startswith(expected) or expected in e for e in errors), errors


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


def test_cli_package_writes_kserve(archive, tmp_path, run_cli):
    pt = archive.parent.parent / "tiny.pt"
    code, out, err = run_cli("package", pt, "--name", "crbp-cli", "--format", "checkpoint", "--out", tmp_path / "store",
                             "--kserve", tmp_path / "kserve", "--storage-uri", "s3://b/crbp-cli", "--json")
    assert code == 0, err
    doc = json.loads(out)
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

    from crbp_deploy.serving.engine import get_engine
    from crbp_deploy.serving.server import ServerConfig
    from crbp_deploy.serving.service import PanopticService, RawRequest

    buf = io.BytesIO()
    Image.fromarray(generate_sample(3, seed=5, size=32)[0]).save(buf, format="PNG")
    image = buf.getvalue()
    port = next(p for p in range(30000 + os.getpid() % 20000, 65000, 7)
                if all(_free(q) for q in range(p, p + 5)))
    srv = get_engine("torchserve").start(archive.parent, ServerConfig(port=port, auth=False, envelope="kservev2"),
                                         run_dir=tmp_path / "run")
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
