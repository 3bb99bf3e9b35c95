"""KServe manifests for the same `.mar`: an InferenceService on KServe's TorchServe runtime, Open
Inference Protocol v2; and for a Triton model repository (package --format triton) on KServe's
`kserve-tritonserver` runtime (`write_triton_kserve`, below).

KServe's TorchServe runtime (modelFormat `pytorch`) downloads `storageUri` to /mnt/models and expects

    config/config.properties     (TorchServe settings; model_snapshot registers the archives)
    model-store/NAME.mar

`write_kserve` lays that folder out (copy it to the storage URI) and writes inferenceservice.yaml.
Choices: `enable_envvars_config=true` so the runtime can select the v2 envelope through an
environment variable; token auth off inside the pod (KServe's ingress / mesh does auth, and the
runtime's proxy sends no TorchServe key); `batchSize` 1, because TorchServe 0.12's kservev2
envelope reads only the first request of a batch (requests 2..n would be answered with an error);
`install_py_dep_per_model=true` so the archive's requirements.txt (onnxruntime) is installed on the
stock runtime image, or give `image=` a custom image with crbp-deploy's runtime deps preinstalled.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError
from . import metrics as model_metrics

API_VERSION = "serving.kserve.io/v1beta1"
KIND = "InferenceService"
MOUNT = "/mnt/models"
INFERENCE_PORT = 8085  # TorchServe behind KServe's wrapper, which listens on 8080
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


@dataclass
class KServeBundle:
    manifest: Path  # inferenceservice.yaml
    storage_dir: Path  # upload this folder to storage_uri
    config: Path
    archive: Path
    storage_uri: str


def kserve_properties(name: str, version: str, workers: int, response_timeout_s: int) -> str:
    snapshot = {
        "name": "startup.cfg",
        "modelCount": 1,
        "models": {
            name: {
                version: {
                    "defaultVersion": True,
                    "marName": f"{name}.mar",
                    "minWorkers": workers,
                    "maxWorkers": workers,
                    "batchSize": 1,
                    "maxBatchDelay": 10,
                    "responseTimeout": response_timeout_s,
                }
            }
        },
    }
    props = {
        "inference_address": f"http://0.0.0.0:{INFERENCE_PORT}",
        "management_address": f"http://0.0.0.0:{INFERENCE_PORT}",
        "metrics_address": "http://0.0.0.0:8082",
        "grpc_inference_port": 7070,
        "grpc_management_port": 7071,
        "enable_metrics_api": "true",
        "metrics_mode": "prometheus",
        "metrics_config": f"{MOUNT}/config/metrics.yaml",
        "number_of_netty_threads": 4,
        "job_queue_size": 100,
        "enable_envvars_config": "true",
        "install_py_dep_per_model": "true",
        "disable_token_authorization": "true",
        "model_store": f"{MOUNT}/model-store",
        "model_snapshot": json.dumps(snapshot, separators=(",", ":")),
    }
    return "".join(f"{k}={v}\n" for k, v in props.items())


def _service(name: str, model: dict[str, Any], image: str | None, min_replicas: int, max_replicas: int) -> dict:
    """The InferenceService around a predictor's `model` spec (TorchServe's or Triton's)."""
    if image:
        model["image"] = image
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": name, "labels": {"app.kubernetes.io/part-of": "crbp-deploy"}},
        "spec": {"predictor": {"minReplicas": min_replicas, "maxReplicas": max_replicas, "model": model}},
    }


def inference_service(
    name: str,
    storage_uri: str,
    *,
    cpu: str = "2",
    memory: str = "4Gi",
    gpus: int = 0,
    image: str | None = None,
    min_replicas: int = 1,
    max_replicas: int = 4,
    threads: int = 1,
) -> dict[str, Any]:
    resources = {"requests": {"cpu": cpu, "memory": memory}, "limits": {"cpu": cpu, "memory": memory}}
    if gpus:
        resources["limits"]["nvidia.com/gpu"] = str(gpus)
    model: dict[str, Any] = {
        "modelFormat": {"name": "pytorch"},
        "protocolVersion": "v2",
        "storageUri": storage_uri,
        "resources": resources,
        "env": [{"name": "OMP_NUM_THREADS", "value": str(threads)}],
    }
    return _service(name, model, image, min_replicas, max_replicas)


def write_kserve(
    archive: str | os.PathLike,
    out: str | os.PathLike,
    *,
    storage_uri: str | None = None,
    version: str = "1.0",
    workers: int = 1,
    response_timeout_s: int = 120,
    **service_options: Any,
) -> KServeBundle:
    """Write `out/model/{config/config.properties, config/metrics.yaml, model-store/NAME.mar}` and
    `out/inferenceservice.yaml` for the archive `NAME.mar`."""
    import yaml

    from .server import metrics_yaml

    archive = Path(archive)
    if archive.suffix != ".mar" or not archive.is_file():
        raise InputError(f"{archive}: not a .mar archive (build one with crbp-deploy package)")
    name = archive.stem
    if not DNS_LABEL.match(name) or len(name) > 45:
        raise InputError(
            f"{name!r} cannot name an InferenceService: use lower-case letters, digits and '-' (at most 45 characters)"
        )
    out = Path(out)
    storage = out / "model"
    (storage / "config").mkdir(parents=True, exist_ok=True)
    (storage / "model-store").mkdir(parents=True, exist_ok=True)
    config = storage / "config" / "config.properties"
    config.write_text(kserve_properties(name, version, workers, response_timeout_s))
    (storage / "config" / "metrics.yaml").write_text(metrics_yaml())
    target = storage / "model-store" / archive.name
    if archive.resolve() != target.resolve():
        shutil.copy2(archive, target)
    uri = storage_uri or f"pvc://crbp-models/{name}"
    manifest = out / "inferenceservice.yaml"
    doc = inference_service(name, uri, **service_options)
    header = (
        f"# generated by crbp-deploy: upload {storage} to {uri} (config/ and model-store/ at its root),\n"
        f"# then: kubectl apply -f {manifest.name}\n"
        f"# metrics: {', '.join(m.name for m in model_metrics.MODEL_METRICS)} on port 8082 (/metrics)\n"
    )
    manifest.write_text(header + yaml.safe_dump(doc, sort_keys=False))
    return KServeBundle(manifest=manifest, storage_dir=storage, config=config, archive=target, storage_uri=uri)


# --- Triton ---------------------------------------------------------------------------------------------
TRITON_RUNTIME = "kserve-tritonserver"  # KServe's ClusterServingRuntime for modelFormat triton
TRITON_SITE = "/opt/crbp/site-packages"  # where a custom image keeps torch, onnxruntime, numpy, pillow


def triton_inference_service(name: str, storage_uri: str, *, image: str | None = None, cpu: str = "2",
                             memory: str = "4Gi", min_replicas: int = 1, max_replicas: int = 4, threads: int = 1,
                             site_packages: str = TRITON_SITE) -> dict[str, Any]:
    """An InferenceService on KServe's Triton runtime serving the repository at `storage_uri` (KServe mounts
    it at /mnt/models and starts tritonserver on it). The model's Python backend needs torch, onnxruntime,
    numpy and pillow: the runtime's stock image has none, so `image` should be one that adds them under
    `site_packages` (the model adds that folder to its path)."""
    from .triton_model import HEADER_PATTERN, SITE_ENV

    resources = {"requests": {"cpu": cpu, "memory": memory}, "limits": {"cpu": cpu, "memory": memory}}
    model: dict[str, Any] = {
        "modelFormat": {"name": "triton"},
        "runtime": TRITON_RUNTIME,
        "protocolVersion": "v2",
        "storageUri": storage_uri,
        "args": ["--model-control-mode=none", f"--http-header-forward-pattern={HEADER_PATTERN}"],
        "resources": resources,
        "env": [{"name": "OMP_NUM_THREADS", "value": str(threads)}, {"name": SITE_ENV, "value": site_packages}],
    }
    return _service(name, model, image, min_replicas, max_replicas)


def write_triton_kserve(repo: str | os.PathLike, name: str, out: str | os.PathLike, *, storage_uri: str | None = None,
                        **options: Any) -> KServeBundle:
    """Copy the Triton model `repo/name` to `out/model/name` (a repository with that one model: upload
    `out/model`) and write `out/inferenceservice.yaml` for KServe's Triton runtime."""
    import yaml

    source = Path(repo) / name
    if not (source / "config.pbtxt").is_file():
        raise InputError(f"{source}: not a Triton model (no config.pbtxt); build one with crbp-deploy package --format triton")
    if not DNS_LABEL.match(name) or len(name) > 45:
        raise InputError(
            f"{name!r} cannot name an InferenceService: use lower-case letters, digits and '-' (at most 45 characters)"
        )
    out = Path(out)
    storage = out / "model"
    target = storage / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
    uri = storage_uri or f"pvc://crbp-models/{name}-triton"
    manifest = out / "inferenceservice.yaml"
    doc = triton_inference_service(name, uri, **options)
    header = (
        f"# generated by crbp-deploy: upload {storage} to {uri} ({name}/ at its root), then: kubectl apply -f {manifest.name}\n"
        "# the image must provide torch, onnxruntime, numpy, pillow (crbp-deploy's runtime) under CRBP_TRITON_SITE_PACKAGES;\n"
        "# auth: KServe's ingress / mesh (the local engine's restricted-API key is not set here). Unverified on a cluster.\n"
    )
    manifest.write_text(header + yaml.safe_dump(doc, sort_keys=False))
    return KServeBundle(manifest=manifest, storage_dir=storage, config=target / "config.pbtxt", archive=target,
                        storage_uri=uri)
