"""`crbp-deploy serve`: start / stop a real TorchServe on 127.0.0.1."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from ..errors import CrbpError


def serve(
    model_store: Path = typer.Option(Path("model_store"), "--model-store", help="Folder with .mar archives (all are served)."),
    port: int = typer.Option(8080, "--port", help="Inference port P; management P+1, metrics P+2 (gRPC P+3, P+4)."),
    no_auth: bool = typer.Option(False, "--no-auth", help="Turn TorchServe's token authorization off."),
    stop: bool = typer.Option(False, "--stop", help="Stop the server on --port and wait until it has exited."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Folder for config, keys, logs (default: ~/.cache/crbp-deploy/torchserve-P)."),
    foreground: bool = typer.Option(False, "--foreground", help="Stay attached; Ctrl-C stops the server."),
) -> None:
    """Start TorchServe on 127.0.0.1 with a generated config.properties, wait until every model is ready."""
    from ..serving import server as ts

    run = run_dir or ts.default_run_dir(port)
    if stop:
        pid = ts.running_pid(run)
        if not ts.stop(run):
            typer.echo(f"no TorchServe started by crbp-deploy is running on port {port} (run folder {run})")
            return
        typer.echo(f"stopped TorchServe (pid {pid}); the Java process and its workers have exited")
        return
    config = ts.ServerConfig(port=port, auth=not no_auth)
    server = ts.start(model_store, config, run_dir=run, progress=typer.echo)
    typer.echo(f"TorchServe is up (pid {server.pid}), serving {', '.join(server.models)}")
    for name in server.models:
        typer.echo(f"  predictions: {server.predictions_url(name)}")
    typer.echo(f"  management:  {server.url('management')}/models")
    typer.echo(f"  metrics:     {server.metrics_url}")
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
    if foreground:
        try:
            while ts.running_pid(run):
                time.sleep(1.0)
            raise CrbpError(f"TorchServe exited on its own; see {run / 'logs'}")
        except KeyboardInterrupt:
            ts.stop(run)
            typer.echo("stopped")
