"""TorchServe handler for crbp-deploy panoptic (and Pathfinder) models: a thin adapter over
crbp_deploy.serving.service, which answers both in the COCO panoptic schema.

It translates TorchServe's batch (a list of input dicts plus the request headers in `context`) to
`RawRequest`s, lets `PanopticService` decode, validate, batch and predict, and writes back one JSON
answer per request with its own HTTP status (`context.set_response_status(code, phrase, idx)`), so a
bad request inside a batch fails alone. It also reports the model metrics declared in
crbp_deploy/serving/metrics.py.

`crbp_deploy` is imported from the unpacked archive (packaged beside this file by `crbp-deploy
package`; TorchServe puts the archive folder first on sys.path), falling back to an installed copy.
Request formats: raw body (`/predictions/NAME`, budget in headers X-Max-Iters / X-Tol), multipart
(field `data`, budget fields `max_iters` / `tol`), `/invocations?model_name=NAME&max_iters=..` and
KServe's Open Inference Protocol v2 envelope (a BYTES input holding the base64 image). Per request also
X-Deadline-Ms, X-Scale (card | native) and X-Client-Id (admission share); refusals for overload carry
Retry-After (`context.set_response_header`).
"""
from __future__ import annotations

import logging
from pathlib import Path

from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler

from crbp_deploy.serving import metrics as specs
from crbp_deploy.serving.service import PanopticService, RawRequest, Reply, ServiceConfig, error_reply
from crbp_deploy.serving.v2 import from_v2_input, is_v2_input

log = logging.getLogger(__name__)
_KINDS = {"counter": MetricTypes.COUNTER, "gauge": MetricTypes.GAUGE, "histogram": MetricTypes.HISTOGRAM}


def _field_type(headers: dict, name: str) -> str:
    """TorchServe records each input's content type as headers[name] = {"content-type": ...}."""
    entry = headers.get(name)
    return entry.get("content-type", "") if isinstance(entry, dict) else ""


def to_raw_request(row: dict, headers: dict) -> RawRequest:
    """One TorchServe input row -> RawRequest (KServe v2 rows carry the image as a base64 string)."""
    plain = {k: v for k, v in headers.items() if isinstance(v, str)}
    if is_v2_input(row):  # Open Inference Protocol v2 input, via the kservev2 envelope
        return from_v2_input(row, plain)
    fields = dict(row)
    return RawRequest(fields, {name: _field_type(headers, name) for name in fields}, plain)


class PanopticHandler(BaseHandler):
    def initialize(self, context):
        props = context.system_properties
        manifest = context.manifest or {}
        model_dir = Path(props.get("model_dir"))
        serialized = (manifest.get("model") or {}).get("serializedFile")
        if not serialized:
            raise RuntimeError("the archive has no serialized model file (crbp-deploy package puts one in)")
        config = ServiceConfig.from_dict((context.model_yaml_config or {}).get("handler") or {})
        import torch

        torch.set_num_threads(config.threads)  # post-processing runs in torch; a worker owns its process
        self.service = PanopticService(model_dir / serialized, config, name=context.model_name)
        import crbp_deploy

        log.info("crbp-deploy %s from %s: %s", crbp_deploy.__version__, crbp_deploy.__file__, self.service.describe())
        self.metrics = {}
        for spec in specs.MODEL_METRICS:
            self.metrics[spec.name] = context.metrics.add_metric_to_cache(
                spec.name, spec.unit, list(spec.dimensions), _KINDS[spec.kind]
            )
        self.context = context
        self.initialized = True

    def handle(self, data, context):
        processors = context.request_processor or []
        requests = [
            to_raw_request(row if isinstance(row, dict) else {"body": row},
                           context.get_all_request_header(i) if i < len(processors) else {})
            for i, row in enumerate(data)
        ]
        try:
            replies = self.service.handle(requests)
        except Exception as exc:  # never lose the batch: every request gets a JSON answer
            log.exception("the batch failed")
            replies = [error_reply(500, f"internal error: {exc}") for _ in requests]
        for i, reply in enumerate(replies):
            if i < len(processors):  # the KServe v2 envelope can hand over more inputs than requests
                context.set_response_content_type(i, "application/json")
                if reply.status != 200:
                    context.set_response_status(reply.status, reply.reason, idx=i)
                for key, value in reply.headers.items():  # Retry-After on 429 / 503
                    context.set_response_header(i, key, value)
            self._record(reply, context.model_name)
        return [reply.json() for reply in replies]

    def _record(self, reply: Reply, model: str) -> None:
        pred = reply.prediction
        if pred is None:
            return
        try:
            self.metrics[specs.ITERATIONS.name].add_or_update(pred.iterations, [model])
            if reply.max_iters:
                self.metrics[specs.BUDGET_USED.name].add_or_update(pred.iterations / reply.max_iters, [model])
            # the alarm is the cap: an image halted by its policy has an answer the policy judged final
            self.metrics[specs.NOT_CONVERGED.name].add_or_update(1 if pred.stopped == "cap" else 0, [model])
            self.metrics[specs.DIVERGED.name].add_or_update(1 if pred.diverged else 0, [model])
            for stage in specs.STAGES:
                seconds = reply.timings_ms.get(stage, 0.0) / 1000.0
                self.metrics[specs.STAGE_LATENCY.name].add_or_update(seconds, [model, stage])
        except Exception:  # metrics must never fail a request
            log.exception("could not record metrics")
