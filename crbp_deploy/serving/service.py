"""Server-independent request logic: image bytes + budget in, COCO panoptic JSON (or a JSON error) out.

The TorchServe handler (handlers/panoptic_handler.py) only translates TorchServe's request and
response objects to `RawRequest` and from `Reply`; decoding, validation, budget rules, batching and
the response schema live here, so the model can move to another server unchanged.

Batching rule: requests are grouped by budget, and within a group by image size (in
`PanopticPredictor`), so a batch only ever holds same-size, same-budget images. Early exit is
per sample, and ONNX Runtime on CPU with one intra-op thread computes each sample of a batch
exactly as it would alone (checked by tests/test_serving.py and benchmarks/serving_bench.py), so a
batched answer equals the unbatched one bit for bit. With more threads (or PyTorch's oneDNN, or a
GPU provider) the last bits depend on the batch composition, which can move an early-exit decision
by one step; such backends run one image per model call, so answers never depend on batching.
"""
from __future__ import annotations

import base64
import json
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..artifact import read_card
from ..budget import MAX_ITERATIONS, Budget
from ..config import StrictConfig
from ..errors import ConfigError, CrbpError, InputError, RequestError
from ..imageio import ImageLimits, decode_image
from ..modelcard import ModelCard
from ..panoptic.encoding import encode_png
from ..panoptic.predict import PanopticPredictor, Prediction

log = logging.getLogger(__name__)

#: Where the image may arrive: the raw body (TorchServe names it "body") or a multipart field.
IMAGE_FIELDS = ("body", "data", "image", "file")
#: Budget parameters: multipart fields / query parameters (where the server passes them) or headers.
BUDGET_FIELDS = ("max_iters", "tol", "threshold", "patience")  # threshold/patience: the served halting policy's
BUDGET_HEADERS = {"max_iters": "x-max-iters", "tol": "x-tol", "threshold": "x-threshold", "patience": "x-patience"}
#: Parameters a server adds on its own (TorchServe's /invocations?model_name=...).
IGNORED_FIELDS = ("model_name",)
REASONS = {
    200: "OK",
    400: "Bad Request",
    413: "Payload Too Large",
    415: "Unsupported Media Type",
    500: "Internal Server Error",
}
HOW_TO_SEND = (
    "send the image bytes as the request body with Content-Type image/png, image/jpeg or image/webp "
    "(or application/octet-stream), or as multipart field 'data'"
)


@dataclass(frozen=True)
class ServiceConfig(StrictConfig):
    """Server-side limits, set in an archive's model-config.yaml under `handler:`."""

    max_iters_limit: int = 200  # a request's max_iters above this is clamped to it
    threads: int = 1  # runtime intra-op threads per worker (scale with workers, not threads)
    backend: str = "auto"  # runtime for the artifact: auto (onnxruntime for .onnx, torch for .pt) | openvino | ...
    precision: str = "fp32"  # fp32 | bf16 (openvino, torch); refused at load where the machine lacks it
    max_bytes: int = 20 * 1024 * 1024
    min_side: int = 8
    max_side: int = 2048
    max_pixels: int = 2048 * 2048

    def validate(self) -> None:
        if not 1 <= self.max_iters_limit <= MAX_ITERATIONS:
            raise ConfigError(f"max_iters_limit must be in 1..{MAX_ITERATIONS}, got {self.max_iters_limit}")
        if self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")
        from ..precision import PRECISIONS
        from ..runtime import ALIASES, KINDS

        if ALIASES.get(self.backend, self.backend) not in KINDS:
            raise ConfigError(f"backend must be one of {', '.join(KINDS)}, got {self.backend!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        self.limits()  # ImageLimits validates itself

    def limits(self) -> ImageLimits:
        return ImageLimits(
            max_bytes=self.max_bytes, min_side=self.min_side, max_side=self.max_side, max_pixels=self.max_pixels
        )


@dataclass
class RawRequest:
    """One request as any HTTP server sees it."""

    fields: Mapping[str, Any]  # named inputs: the body, multipart fields, query parameters
    field_types: Mapping[str, str] = field(default_factory=dict)  # content type per field ("" = not given)
    headers: Mapping[str, Any] = field(default_factory=dict)  # HTTP headers, any case
    error: str | None = None  # set by an adapter that could not even unwrap the request (answered 400)


@dataclass
class Parsed:
    image: np.ndarray  # H x W x 3 float32 in [0, 1]
    budget: dict[str, Any]  # {"max_iters", "tol"} as run
    requested: dict[str, Any]  # what the request asked for
    clamped: bool
    decode_ms: float


@dataclass
class Reply:
    """HTTP status + JSON body; `prediction` and `timings_ms` are kept for metrics."""

    status: int
    body: dict[str, Any]
    prediction: Prediction | None = None
    max_iters: int | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def reason(self) -> str:
        return REASONS.get(self.status, "")

    def json(self) -> str:
        return json.dumps(self.body, allow_nan=False)


def error_reply(status: int, message: str) -> Reply:
    return Reply(status, {"status": status, "error": REASONS.get(status, "Error"), "message": message})


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return repr(bytes(value)[:20])
    return str(value)


def _number(key: str, text: str) -> int | float:
    text = text.strip()
    try:
        return int(text) if key in ("max_iters", "patience") else float(text)
    except ValueError:
        kind = "an integer" if key in ("max_iters", "patience") else "a number"
        raise RequestError(f"{key} must be {kind}, got {text!r}") from None


def artifact_card(path: Path, backend) -> ModelCard:
    """The model card (categories, inference settings) of an .onnx artifact or a checkpoint."""
    if path.suffix != ".onnx":
        return ModelCard.of(getattr(backend, "model", None))
    card = read_card(path)
    if card is None:
        raise CrbpError(f"{path}: its sidecar {path.name}.json (model card with the categories) is missing")
    return card


class PanopticService:
    """Loads a model artifact through `crbp_deploy.runtime` and answers requests.

    `artifact`: an exported early-exit `.onnx` (with its sidecar) or a checkpoint `.pt`.
    """

    def __init__(self, artifact: str | Path, config: ServiceConfig | None = None, *, name: str | None = None):
        from ..runtime import OrtBackend, load_backend

        self.config = config or ServiceConfig()
        self.path = Path(artifact)
        self.name = name or self.path.stem
        options = {"threads": self.config.threads}
        if self.config.precision != "fp32":
            options["precision"] = self.config.precision
        self.backend = load_backend(self.path, self.config.backend, **options)
        if self.backend.strategy == "unrolled":
            raise CrbpError(
                f"{self.path.name} runs a fixed {self.backend.default_budget.iters} steps (unrolled); serving "
                "needs an early-exit export (strategy=loop) or a checkpoint, so requests can set max_iters/tol"
            )
        card = artifact_card(self.path, self.backend)
        if not card.categories:
            raise CrbpError(f"{self.path}: its model card lists no categories; not a trained panoptic model")
        self.default_budget = self._default_budget(card)
        self.predictor = PanopticPredictor(
            self.backend.run,
            card.categories,
            stride=self.backend.size_multiple,
            budget=self.default_budget,
            postprocess_config=card.postprocess,
        )
        self.categories = [dict(c) for c in card.categories]
        # Only ONNX Runtime on CPU with one intra-op thread computes each sample of a batch exactly as
        # alone (measured: with 2 threads the bundled model's heads moved by ~2e-6 between batch sizes).
        self.batch_invariant = (
            isinstance(self.backend, OrtBackend)
            and self.backend.threads == 1
            and self.backend.providers == ["CPUExecutionProvider"]
        )
        self.limits = self.config.limits()

    def _default_budget(self, card: ModelCard) -> dict[str, Any]:
        # a fixed-count card: serve early exit with the artifact's defaults (else the default budget)
        budget = self.backend.budget_for(card.budget).kwargs()
        if budget["max_iters"] > self.config.max_iters_limit:
            raise ConfigError(
                f"max_iters_limit={self.config.max_iters_limit} is below the model's default "
                f"max_iters={budget['max_iters']}; raise the limit"
            )
        return budget

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.name,
            "artifact": self.path.name,
            "backend": self.backend.name,
            "strategy": self.backend.strategy,
            "default_budget": self.default_budget,
            "max_iters_limit": self.config.max_iters_limit,
            "batch_invariant": self.batch_invariant,
            "limits": self.limits.to_dict(),
        }

    # --- requests -----------------------------------------------------------------------------
    def resolve_budget(self, fields: Mapping[str, Any], headers: Mapping[str, Any]) -> tuple[dict, dict, bool]:
        """(budget to run, what was requested, clamped?) from fields or X-Max-Iters / X-Tol headers."""
        lower = {str(k).lower(): v for k, v in headers.items()}
        requested: dict[str, Any] = {}
        for key in BUDGET_FIELDS:
            from_field, from_header = _text(fields.get(key)), _text(lower.get(BUDGET_HEADERS[key]))
            if from_field is not None and from_header is not None and from_field.strip() != from_header.strip():
                raise RequestError(
                    f"{key} given twice with different values: {from_field!r} as a parameter and "
                    f"{from_header!r} as header {BUDGET_HEADERS[key]}"
                )
            text = from_field if from_field is not None else from_header
            if text is not None:
                requested[key] = _number(key, text)
        limit = self.config.max_iters_limit
        try:
            budget = Budget.from_dict({**self.default_budget, **requested}).kwargs()
        except InputError as exc:  # the limit is named only where the error is about max_iters
            note = f" (this server runs at most max_iters={limit} per image)" if "max_iters" in str(exc) else ""
            raise RequestError(f"{exc}{note}") from None
        clamped = budget["max_iters"] > limit
        if clamped:
            budget["max_iters"] = limit
        return budget, requested, clamped

    def parse(self, raw: RawRequest) -> Parsed:
        """Validate one request; raises RequestError naming the problem."""
        if raw.error:
            raise RequestError(raw.error)
        fields = dict(raw.fields)
        ctype = _text({str(k).lower(): v for k, v in raw.headers.items()}.get("content-type")) or ""
        if ctype.split(";")[0].strip().lower() == "application/x-www-form-urlencoded":  # parsed as form fields
            raise RequestError(
                f"Content-Type application/x-www-form-urlencoded is not an image (curl --data-binary sends it "
                f"unless told otherwise); {HOW_TO_SEND}",
                415,
            )
        unknown = sorted(set(fields) - {*IMAGE_FIELDS, *BUDGET_FIELDS, *IGNORED_FIELDS})
        if unknown:
            raise RequestError(
                f"unknown parameter(s) {', '.join(map(repr, unknown))}; accepted: max_iters, tol, threshold, patience "
                f"(or headers X-Max-Iters, X-Tol, X-Threshold, X-Patience) and the image"
            )
        budget, requested, clamped = self.resolve_budget(fields, raw.headers)
        present = [name for name in IMAGE_FIELDS if name in fields]
        if not present:
            raise RequestError(f"no image in the request; {HOW_TO_SEND}")
        if len(present) > 1:
            raise RequestError(f"more than one image field ({', '.join(present)}); send one image per request")
        name = present[0]
        ctype = (raw.field_types.get(name) or "").split(";")[0].strip().lower()
        if ctype and not (ctype.startswith("image/") or ctype == "application/octet-stream"):
            raise RequestError(f"Content-Type {ctype} is not an image; {HOW_TO_SEND}", 415)
        value = fields[name]
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise RequestError(f"the image arrived as {type(value).__name__}, not bytes; {HOW_TO_SEND}", 415)
        data = bytes(value)
        if len(data) > self.limits.max_bytes:
            raise RequestError(f"image: {len(data)} bytes exceeds the limit of {self.limits.max_bytes} bytes", 413)
        started = time.perf_counter()
        try:
            image = decode_image(data, name="image", limits=self.limits)
        except InputError as exc:
            raise RequestError(str(exc)) from None
        decode_ms = 1000 * (time.perf_counter() - started)
        return Parsed(image, budget, requested, clamped, decode_ms)

    def run(self, parsed: Sequence[Parsed]) -> list[Reply]:
        """Predict valid requests: one model call per (budget, size) group; a failing group fails alone."""
        replies: list[Reply | None] = [None] * len(parsed)
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(parsed):
            groups.setdefault(tuple(sorted(p.budget.items())), []).append(i)
        for key, members in groups.items():
            chunks = [members] if self.batch_invariant else [[i] for i in members]
            for chunk in chunks:
                try:
                    preds = self.predictor.predict([parsed[i].image for i in chunk], **dict(key))
                except Exception as exc:  # the runtime's own failures: answer 500 for this group only
                    log.exception("inference failed for %d request(s)", len(chunk))
                    for i in chunk:
                        replies[i] = error_reply(500, f"inference failed: {exc}")
                    continue
                sizes = Counter(parsed[i].image.shape[:2] for i in chunk)
                for i, pred in zip(chunk, preds):
                    replies[i] = self.reply_for(parsed[i], pred, batch=sizes[parsed[i].image.shape[:2]])
        return replies  # type: ignore[return-value]

    def handle(self, requests: Sequence[RawRequest]) -> list[Reply]:
        """Parse every request, run the valid ones together; a bad request never fails the others."""
        replies: list[Reply | None] = [None] * len(requests)
        valid: list[tuple[int, Parsed]] = []
        for i, raw in enumerate(requests):
            try:
                valid.append((i, self.parse(raw)))
            except RequestError as exc:
                replies[i] = error_reply(exc.status, str(exc))
            except Exception as exc:  # a bug, not the client's fault; the others still get answers
                log.exception("request %d could not be parsed", i)
                replies[i] = error_reply(500, f"internal error while reading the request: {exc}")
        for (i, _), reply in zip(valid, self.run([p for _, p in valid])):
            replies[i] = reply
        return replies  # type: ignore[return-value]

    def reply_for(self, parsed: Parsed, pred: Prediction, batch: int) -> Reply:
        """The 200 reply for one parsed request and its prediction (any engine or scheduler may call it)."""
        started = time.perf_counter()
        png = base64.b64encode(encode_png(pred.pan_ids)).decode("ascii")
        encode_ms = 1000 * (time.perf_counter() - started)
        timings = {
            "decode": round(parsed.decode_ms, 3),
            "model": pred.timings_ms.get("model", 0.0),
            "postprocess": pred.timings_ms.get("postprocess", 0.0),
            "encode": round(encode_ms, 3),
        }
        timings["total"] = round(sum(timings.values()), 3)
        residual = pred.residual if math.isfinite(pred.residual) else None
        body = {
            "model": self.name,
            "size": [int(pred.pan_ids.shape[0]), int(pred.pan_ids.shape[1])],
            "segments_info": pred.segments_info,
            "panoptic_png": png,
            "categories": self.categories,
            "iterations": pred.iterations,
            "residual": residual,
            "converged": pred.converged,
            "diverged": pred.diverged,
            "stopped": pred.stopped,
            "budget": {**parsed.budget, "clamped": parsed.clamped, "requested": parsed.requested},
            "batch_size": batch,
            "timings_ms": timings,
        }
        return Reply(200, body, prediction=pred, max_iters=parsed.budget["max_iters"], timings_ms=timings)
