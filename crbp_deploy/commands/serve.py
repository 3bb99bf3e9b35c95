"""`crbp-deploy serve`: start / stop a real TorchServe, a local Ray Serve cluster, or Triton, on 127.0.0.1."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from ..errors import CrbpError
from ..serving.engine import DEFAULT_ENGINE, ENGINES, get_engine


def serve(
    model_store: Optional[Path] = typer.Option(None, "--model-store", help="Folder with .mar archives, all served (default model_store); Triton: the model repository (default model_repository)."),
    port: int = typer.Option(8080, "--port", help="Inference port P; TorchServe: management P+1, metrics P+2 (gRPC P+3, P+4); Ray: P+1..P+8 for the cluster; Triton: gRPC P+1, metrics P+2."),
    engine: str = typer.Option(DEFAULT_ENGINE, "--engine", help="torchserve (one machine), ray (Ray Serve: replicas, scale-out) or triton (Triton Inference Server)."),
    replicas: Optional[int] = typer.Option(None, "--replicas", help="Ray Serve replicas (--engine ray; default 1)."),
    no_auth: bool = typer.Option(False, "--no-auth", help="Turn token authorization off."),
    stop: bool = typer.Option(False, "--stop", help="Stop the server on --port (either engine) and wait until it has exited."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Folder for config, keys, logs (default: ~/.cache/crbp-deploy/ENGINE-P)."),
    foreground: bool = typer.Option(False, "--foreground", help="Stay attached; Ctrl-C stops the server."),
) -> None:
    """Start TorchServe (or Ray Serve with --engine ray) on 127.0.0.1, wait until every model is ready."""
    chosen = get_engine(engine)
    if stop:
        _stop(port, run_dir, chosen)
        return
    config = chosen.configure(port, auth=not no_auth, replicas=replicas)
    run = run_dir or chosen.default_run_dir(port)
    store = model_store or Path("model_repository" if engine == "triton" else "model_store")
    server = chosen.start(store, config, run_dir=run, progress=typer.echo)
    for line in server.summary():
        typer.echo(line)
    _usage(server, port)
    if foreground:
        _attach(lambda: chosen.running(run), lambda: chosen.stop(run), chosen.gone.format(logs=chosen.log_dir(run)))


def _usage(server, port: int) -> None:
    if server.key_file:
        typer.echo(f"  token auth on: keys in {server.key_file} (send 'Authorization: Bearer <inference key>')")
        auth = " -H 'Authorization: Bearer <inference key>'"
    else:
        typer.echo("  token auth OFF (--no-auth)")
        auth = ""
    first = server.models[0]
    if server.engine != "triton":  # Triton takes KServe v2 requests (the image as a UINT8 tensor), not a raw body
        typer.echo(f"try: curl{auth} -H 'Content-Type: image/png' --data-binary @IMAGE.png {server.predictions_url(first)}")
        typer.echo(f"  or: crbp-deploy predict IMAGE.png --url {server.predictions_url(first)}")
    else:
        typer.echo(f"try: crbp-deploy predict IMAGE.png --url {server.predictions_url(first)}")
    typer.echo(f"stop: crbp-deploy serve --stop --port {port}")


def _attach(alive, stop, gone: str) -> None:
    try:
        while alive():
            time.sleep(1.0)
        raise CrbpError(gone)
    except KeyboardInterrupt:
        stop()
        typer.echo("stopped")


def _stop(port: int, run_dir: Optional[Path], engine) -> None:
    """Stop what this project started on `port`. With the default engine, a live server of any engine on
    that port is stopped (users type `serve --stop --port P` whatever they started); else only that engine's."""
    others = [get_engine(name) for name in ENGINES if name != engine.name] if engine.name == DEFAULT_ENGINE else []
    for candidate in [*others, engine]:
        run = run_dir or candidate.default_run_dir(port)
        pid = candidate.running(run)
        if (pid or candidate is engine) and candidate.stop(run):
            typer.echo(candidate.stopped.format(pid=pid))
            return
    typer.echo(f"no {engine.noun} started by crbp-deploy is running on port {port} (run folder {run})")
