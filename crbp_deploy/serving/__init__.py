"""Serving over HTTP: the request logic (service), .mar packaging (archive), the engines that run it
behind one `Engine` interface (engine: TorchServe in server, Ray Serve in ray_engine), a client, and
KServe manifests. TorchServe needs `crbp-deploy[serve]` (torchserve, torch-model-archiver, pyyaml) and
Java 17, Ray `crbp-deploy[ray]`; `service`, `client` and `engine` need neither.
"""
from .client import Answer, Client, ServerError, find_token, predictions_url, sniff_content_type, to_prediction
from .engine import ENGINES, Engine, Running, get_engine
from .service import PanopticService, RawRequest, Reply, RequestError, ServiceConfig

__all__ = [
    "Answer",
    "Client",
    "ENGINES",
    "Engine",
    "PanopticService",
    "RawRequest",
    "Reply",
    "RequestError",
    "Running",
    "ServerError",
    "ServiceConfig",
    "find_token",
    "get_engine",
    "predictions_url",
    "sniff_content_type",
    "to_prediction",
]
