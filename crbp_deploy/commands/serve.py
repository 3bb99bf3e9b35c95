"""`crbp-deploy serve`: start / stop a real TorchServe, or a local Ray Serve cluster, on 127.0.0.1."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from ..errors import CrbpError

ENGINES = ("torchserve", "ray")


def serve(
    model_store: Path = typer.Option(Path("model_store"), "--model-store", help="Folder with .mar archives (all are served)."),
    port: int = typer.Option(8080, "--port", help="Inference port P; TorchServe: management P+1, metrics P+2 (gRPC P+3, P+4); Ray: P+1..P+8 for the cluster."),
    engine: str = typer.Option("torchserve", "--engine", help="torchserve (one machine) or ray (Ray Serve: replicas, scale-out)."),
    replicas: Optional[int] = typer.Option(None, "--replicas", help="Ray Serve replicas (--engine ray; default 1)."),
    no_auth: bool = typer.Option(False, "--no-auth", help="Turn token authorization off."),
    stop: bool = typer.Option(False, "--stop", help="Stop the server on --port (either engine) and wait until it has exited."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Folder for config, keys, logs (default: ~/.cache/crbp-deploy/ENGINE-P)."),
    foreground: bool = typer.Option(False, "--foreground", help="Stay attached; Ctrl-C stops the server."),
) -> None:
    """Start TorchServe (or Ray Serve with --engine ray) on 127.0.0.1, wait until every model is ready."""
    if engine not in ENGINES:
        raise CrbpError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if stop:
        _stop(port, run_dir, engine)
        return
    if engine == "ray":
        _serve_ray(model_store, port, replicas, no_auth, run_dir, foreground)
        return
    if replicas is not None:
        raise CrbpError("--replicas is for --engine ray; TorchServe scales with workers: crbp-deploy package --workers N")
    from ..serving import server as ts

    run = run_dir or ts.default_run_dir(port)
    config = ts.ServerConfig(port=port, auth=not no_auth)
    server = ts.start(model_store, config, run_dir=run, progress=typer.echo)
    typer.echo(f"TorchServe is up (pid {server.pid}), serving {', '.join(server.models)}")
    for name in server.models:
        typer.echo(f"  predictions: {server.predictions_url(name)}")
    typer.echo(f"  management:  {server.url('management')}/models")
    typer.echo(f"  metrics:     {server.metrics_url}")
    _usage(server, port)
    if foreground:
        _attach(lambda: ts.running_pid(run), lambda: ts.stop(run), f"TorchServe exited on its own; see {run / 'logs'}")


def _usage(server, port: int) -> None:
    if server.key_file:
        typer.echo(f"  token auth on: keys in {server.key_file} (send 'Authorization: Bearer <inference key>')")
        auth = " -H 'Authorization: Bearer <inference key>'"
    else:
        typer.echo("  token auth OFF (--no-auth)")
        auth = ""
    first = server.models[0]
    typer.echo(f"try: curl{auth} -H 'Content-Type: image/png' --data-binary @IMAGE.png {server.predictions_url(first)}")
    typer.echo(f"  or: crbp-deploy predict IMAGE.png --url {server.predictions_url(first)}")
    typer.echo(f"stop: crbp-deploy serve --stop --port {port}")


def _attach(alive, stop, gone: str) -> None:
    try:
        while alive():
            time.sleep(1.0)
        raise CrbpError(gone)
    except KeyboardInterrupt:
        stop()
        typer.echo("stopped")


def _serve_ray(model_store: Path, port: int, replicas: Optional[int], no_auth: bool, run_dir: Optional[Path],
               foreground: bool) -> None:
    from ..serving import ray_engine

    config = ray_engine.RayConfig(port=port, replicas=1 if replicas is None else replicas, auth=not no_auth)
    ray_engine.check_installed()
    run = run_dir or ray_engine.default_run_dir(port)
    server = ray_engine.start(model_store, config, run_dir=run, progress=typer.echo)
    typer.echo(f"Ray Serve is up ({config.replicas} replica(s)), serving {', '.join(server.models)}")
    for name in server.models:
        typer.echo(f"  predictions: {server.predictions_url(name)}")
    typer.echo(f"  cluster configs: {', '.join(str(p) for p in server.files.values())} (serve deploy / KubeRay)")
    _usage(server, port)
    if foreground:
        _attach(lambda: ray_engine.running(run), lambda: ray_engine.stop(run), f"the Ray cluster exited; see {ray_engine.temp_dir(run)}")


def _stop(port: int, run_dir: Optional[Path], engine: str) -> None:
    """Stop whatever this project started on `port`: a Ray cluster or a TorchServe."""
    from ..serving import ray_engine
    from ..serving import server as ts

    ray_run = run_dir or ray_engine.default_run_dir(port)
    if engine == "ray" or ray_engine.running(ray_run):
        if ray_engine.stop(ray_run):
            typer.echo("stopped the Ray cluster; its processes have exited")
            return
        if engine == "ray":
            typer.echo(f"no Ray cluster started by crbp-deploy is running on port {port} (run folder {ray_run})")
            return
    run = run_dir or ts.default_run_dir(port)
    pid = ts.running_pid(run)
    if not ts.stop(run):
        typer.echo(f"no TorchServe started by crbp-deploy is running on port {port} (run folder {run})")
        return
    typer.echo(f"stopped TorchServe (pid {pid}); the Java process and its workers have exited")
