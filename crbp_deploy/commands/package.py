"""`crbp-deploy package`: a TorchServe .mar (optionally KServe manifests), or a Triton model repository."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def package(
    model: Optional[str] = typer.Argument(None, help="Early-exit .onnx export, checkpoint or bundled model (default: bundled)."),
    name: Optional[str] = typer.Option(None, "--name", help="Model name (default: crbp-panoptic for the bundled model, else the file name)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Model store folder for NAME.mar (default model_store); with --format triton the repository (default model_repository)."),
    fmt: str = typer.Option("onnx", "--format", help="onnx (export a checkpoint first) | checkpoint (serve it with PyTorch) | triton (a Triton model repository entry, ONNX inside)."),
    workers: int = typer.Option(1, "--workers", help="TorchServe workers (processes) for this model."),
    batch_size: int = typer.Option(8, "--batch-size", help="TorchServe batchSize: requests run together."),
    max_batch_delay: int = typer.Option(10, "--max-batch-delay", help="TorchServe maxBatchDelay in ms."),
    response_timeout: int = typer.Option(120, "--response-timeout", help="TorchServe responseTimeout in s."),
    threads: int = typer.Option(1, "--threads", help="Runtime threads per worker."),
    max_iters_limit: int = typer.Option(200, "--max-iters-limit", help="Largest max_iters a request gets (more is clamped)."),
    deadline_ms: int = typer.Option(5000, "--deadline-ms", help="Wall-clock limit per request (its X-Deadline-Ms is clamped to it); at most a quarter of --response-timeout."),
    max_cost: int = typer.Option(1 << 24, "--max-cost", help="Pixels x iterations one request may use (413 when one step does not fit)."),
    backend: str = typer.Option("auto", "--backend", help="Runtime in the worker: auto (onnxruntime for .onnx) | openvino | torch."),
    precision: str = typer.Option("fp32", "--precision", help="fp32 | bf16 (openvino / torch)."),
    handler: Optional[Path] = typer.Option(None, "--handler", help="Handler file (default: handlers/panoptic_handler.py)."),
    kserve: Optional[Path] = typer.Option(None, "--kserve", help="Also write KServe manifests (InferenceService, v2) here."),
    storage_uri: Optional[str] = typer.Option(None, "--storage-uri", help="KServe storageUri (default: pvc://crbp-models/NAME)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Build NAME.mar (model + card + handler + crbp_deploy sources + model-config.yaml) with torch-model-archiver,
    or with --format triton the Triton model REPO/NAME (config.pbtxt, Python-backend model.py, model, sources)."""
    from ..serving.archive import ArchiveConfig, package as build
    from ..serving.service import ServiceConfig

    service = ServiceConfig(threads=threads, max_iters_limit=max_iters_limit, backend=backend, precision=precision,
                            deadline_ms=deadline_ms, max_cost=max_cost)
    if fmt == "triton":
        _triton(model, name, out or Path("model_repository"), service, kserve, storage_uri, as_json)
        return
    out = out or Path("model_store")
    config = ArchiveConfig(workers=workers, batch_size=batch_size, max_batch_delay_ms=max_batch_delay,
                           response_timeout_s=response_timeout)
    result = build(model, name=name, out=out, fmt=fmt, config=config, service=service, handler=handler,
                   progress=None if as_json else typer.echo)
    doc = result.to_dict()
    if kserve is not None:
        from ..serving.kserve import write_kserve

        bundle = write_kserve(result.path, kserve, storage_uri=storage_uri, version=config.version,
                              workers=workers, response_timeout_s=response_timeout, threads=threads)
        doc["kserve"] = {"manifest": str(bundle.manifest), "storage_dir": str(bundle.storage_dir),
                         "storage_uri": bundle.storage_uri}
    if as_json:
        typer.echo(json.dumps(doc, indent=2))
        return
    typer.echo(f"wrote {result.path} ({result.size_bytes / 1e6:.1f} MB, {result.format}: {result.model_file} from {result.source})")
    typer.echo(f"  TorchServe: workers {workers}, batchSize {batch_size}, maxBatchDelay {max_batch_delay} ms, "
               f"responseTimeout {response_timeout} s; max_iters limit {max_iters_limit}, {threads} thread(s)/worker")
    if kserve is not None:
        typer.echo(f"  KServe: {doc['kserve']['manifest']} (upload {doc['kserve']['storage_dir']} to {doc['kserve']['storage_uri']})")
    typer.echo(f"serve it: crbp-deploy serve --model-store {out}")


def _triton(model, name, out: Path, service, kserve: Optional[Path], storage_uri: Optional[str], as_json: bool) -> None:
    from ..serving.triton_model import package_triton

    repo = package_triton(model, name=name, out=out, service=service, progress=None if as_json else typer.echo)
    doc = repo.to_dict()
    if kserve is not None:
        from ..serving.kserve import write_triton_kserve

        bundle = write_triton_kserve(repo.path, repo.name, kserve, storage_uri=storage_uri)
        doc["kserve"] = {"manifest": str(bundle.manifest), "storage_dir": str(bundle.storage_dir),
                         "storage_uri": bundle.storage_uri}
    if as_json:
        typer.echo(json.dumps(doc, indent=2))
        return
    typer.echo(f"wrote {repo.path / repo.name} (Triton model {repo.name}: {repo.model_file} from {repo.source}; "
               f"{', '.join(repo.files)})")
    if kserve is not None:
        typer.echo(f"  KServe: {doc['kserve']['manifest']} (upload {doc['kserve']['storage_dir']} to {doc['kserve']['storage_uri']})")
    typer.echo(f"serve it: crbp-deploy serve --engine triton --model-store {out}")
