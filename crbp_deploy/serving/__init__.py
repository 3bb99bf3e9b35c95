"""Serving over HTTP: the request logic (service), .mar packaging (archive), TorchServe start/stop
(server), a client, and KServe manifests. The server-specific parts need `crbp-deploy[serve]`
(torchserve, torch-model-archiver, pyyaml) and Java 17; `service` and `client` need neither.
"""
from .client import Answer, Client, ServerError, find_token, predictions_url, sniff_content_type, to_prediction
from .service import PanopticService, RawRequest, Reply, RequestError, ServiceConfig

__all__ = [
    "Answer",
    "Client",
    "PanopticService",
    "RawRequest",
    "Reply",
    "RequestError",
    "ServerError",
    "ServiceConfig",
    "find_token",
    "predictions_url",
    "sniff_content_type",
    "to_prediction",
]
