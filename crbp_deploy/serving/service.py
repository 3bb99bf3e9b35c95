"""Server-independent request logic: image bytes + budget in, COCO panoptic JSON (or a JSON error) out.

A panoptic model answers through `PanopticPredictor`; a Pathfinder-task model through `MaskPredictor`
(serving/mask.py: one `contour` category, its argmax mask as the one segment), picked by the model's task
(`served_task`), so both give the same response schema.

The TorchServe handler (handlers/panoptic_handler.py) only translates TorchServe's request and
response objects to `RawRequest` and from `Reply`; decoding, validation, budget rules, batching and
the response schema live here, so the model can move to another server unchanged. So do the limits
on one request's compute (cost cap, deadline, the input-scale policy) and admission control
(serving/admission.py): every engine gets them by calling `accept` / `run` / `reply_for` (or `handle`).

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..artifact import read_card
from ..budget import MAX_ITERATIONS, Budget
from ..config import StrictConfig
from ..errors import ConfigError, CrbpError, InputError, Overloaded, RequestError
from ..imageio import ImageLimits, decode_image, to_channels
from ..modelcard import ModelCard
from ..panoptic.encoding import encode_png
from ..panoptic.predict import SCALES, PanopticPredictor, Prediction, resize_image, restore, trained_scale
from .admission import ANONYMOUS, Admission

log = logging.getLogger(__name__)

#: Where the image may arrive: the raw body (TorchServe names it "body") or a multipart field.
IMAGE_FIELDS = ("body", "data", "image", "file")
#: Budget parameters: multipart fields / query parameters (where the server passes them) or headers.
BUDGET_FIELDS = ("max_iters", "tol", "threshold", "patience")  # threshold/patience: the served halting policy's
BUDGET_HEADERS = {"max_iters": "x-max-iters", "tol": "x-tol", "threshold": "x-threshold", "patience": "x-patience"}
#: Per-request limits and the input scale: fields / query parameters or headers.
REQUEST_FIELDS = ("deadline_ms", "scale")
REQUEST_HEADERS = {"deadline_ms": "x-deadline-ms", "scale": "x-scale"}
CLIENT_HEADER = "x-client-id"  # who is counted for the admission share (absent: only the worker's limit)
#: Safety margin on the measured speed when the deadline bounds a request's iterations up front.
DEADLINE_MARGIN = 0.8
#: Parameters a server adds on its own (TorchServe's /invocations?model_name=...).
IGNORED_FIELDS = ("model_name",)
REASONS = {
    200: "OK",
    400: "Bad Request",
    413: "Payload Too Large",
    415: "Unsupported Media Type",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
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
    # bounded compute (docs/serving.md, "Overload and bounded compute")
    max_cost: int = 1 << 24  # pixels x iterations one request may use (at its working size); 16.8M = 512^2 x 64
    deadline_ms: int = 5000  # per request; a request's x-deadline-ms is clamped to it; well inside responseTimeout
    scale: str = "card"  # card: resize to the trained scale and answer at the original size | native
    admission: bool = True  # refuse what the worker cannot clear within the deadline (503) or a client's excess (429)
    client_share: float = 0.25  # the part of a worker's deadline window one client (X-Client-Id) may fill
    capacity: float = 0.0  # pixel-iterations per second per worker; 0 = measured at start, then learned

    def validate(self) -> None:
        if not 1 <= self.max_iters_limit <= MAX_ITERATIONS:
            raise ConfigError(f"max_iters_limit must be in 1..{MAX_ITERATIONS}, got {self.max_iters_limit}")
        if self.max_cost < 1:
            raise ConfigError(f"max_cost (pixels x iterations per request) must be >= 1, got {self.max_cost}")
        if not 1 <= self.deadline_ms <= 600_000:
            raise ConfigError(f"deadline_ms must be in 1..600000 (ms per request), got {self.deadline_ms}")
        if self.scale not in SCALES:
            raise ConfigError(f"scale must be one of {', '.join(SCALES)}, got {self.scale!r}")
        if not (0 < self.client_share <= 1):
            raise ConfigError(f"client_share must be in (0, 1], got {self.client_share}")
        if not (math.isfinite(self.capacity) and self.capacity >= 0):
            raise ConfigError(f"capacity must be >= 0 pixel-iterations/s (0 = measure), got {self.capacity}")
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
    image: np.ndarray  # H x W x C (the model's C) float32 in [0, 1], at its working size (the scale policy applied)
    budget: dict[str, Any]  # {"max_iters", "tol"} as run
    requested: dict[str, Any]  # what the request asked for
    clamped: bool
    decode_ms: float
    size: tuple[int, int] = (0, 0)  # the original H x W: the answer is mapped back to it
    scale: str = "native"
    deadline: float | None = None  # absolute time.monotonic() by which the answer is due
    deadline_ms: float = 0.0
    client: str = ANONYMOUS
    cost: float = 0.0  # estimated pixel-iterations (admission)
    bound: str = ""  # "budget" / "deadline" where that limit lowered max_iters (a stop at it is named so)


@dataclass
class Reply:
    """HTTP status + JSON body (+ headers such as Retry-After); `prediction`, `timings_ms` for metrics."""

    status: int
    body: dict[str, Any]
    prediction: Prediction | None = None
    max_iters: int | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def reason(self) -> str:
        return REASONS.get(self.status, "")

    def json(self) -> str:
        return json.dumps(self.body, allow_nan=False)


def error_reply(status: int, message: str, retry_after_s: float | None = None) -> Reply:
    body = {"status": status, "error": REASONS.get(status, "Error"), "message": message}
    if retry_after_s is None:
        return Reply(status, body)
    body["retry_after_s"] = retry_after_s
    return Reply(status, body, headers={"Retry-After": str(int(math.ceil(retry_after_s)))})


def refusal(exc: RequestError) -> Reply:
    """The reply for a refused request; an Overloaded one carries Retry-After."""
    return error_reply(exc.status, str(exc), getattr(exc, "retry_after_s", None))


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


def _given(fields: Mapping[str, Any], lower: Mapping[str, Any], key: str, header: str) -> str | None:
    """A request option from its field or its header (lower-case keys); both given must agree."""
    from_field, from_header = _text(fields.get(key)), _text(lower.get(header))
    if from_field is not None and from_header is not None and from_field.strip() != from_header.strip():
        raise RequestError(
            f"{key} given twice with different values: {from_field!r} as a parameter and "
            f"{from_header!r} as header {header}"
        )
    return from_field if from_field is not None else from_header


def client_of(headers: Mapping[str, Any]) -> str:
    """Who a request is counted as for the admission share: its X-Client-Id (first 64 characters)."""
    value = next((v for k, v in headers.items() if str(k).lower() == CLIENT_HEADER), None)
    return (_text(value) or "").strip()[:64] or ANONYMOUS


def artifact_card(path: Path, backend) -> ModelCard:
    """The model card (categories, inference settings) of an .onnx artifact or a checkpoint."""
    if path.suffix != ".onnx":
        return ModelCard.of(getattr(backend, "model", None))
    card = read_card(path)
    if card is None:
        raise CrbpError(f"{path}: its sidecar {path.name}.json (model card with the categories) is missing")
    return card


#: Tasks the service answers; a registered architecture of another task is refused at load.
SERVED_TASKS = ("panoptic", "pathfinder")


def served_task(arch: str) -> str:
    """The task of a registered architecture (its class's `task`): picks the predictor and what a card must
    hold. An artifact that names no architecture this version knows (older exports name none) is served as
    panoptic, as before tasks were told apart: its card's categories decide whether it can be."""
    from ..models import get_entry, list_models

    return getattr(get_entry(arch).builder, "task", "panoptic") if arch in list_models() else "panoptic"


def check_servable(task: str, card: ModelCard, where: str) -> None:
    """A panoptic model needs its categories (the answer names them); a Pathfinder model has its own one."""
    if task not in SERVED_TASKS:
        raise CrbpError(f"{where}: a {task} model; serving answers {' and '.join(SERVED_TASKS)} models")
    if task == "panoptic" and not card.categories:
        raise CrbpError(f"{where}: its model card lists no categories; not a trained panoptic model "
                        "(nor a Pathfinder-task model)")


def backend_arch(backend) -> str:
    """The architecture a runtime Backend runs: its PyTorch model's, or the one an export's metadata names."""
    model = getattr(backend, "model", None)
    return getattr(model, "arch", "") if model is not None else getattr(getattr(backend, "meta", None), "arch", "")


class PanopticService:
    """Loads a model artifact through `crbp_deploy.runtime` and answers requests.

    `artifact`: an exported early-exit `.onnx` (with its sidecar) or a checkpoint (`.pt`, or a public-code
    `.pth.tar`, which `checkpoint.load` maps); a panoptic or a Pathfinder-task model (module docstring).
    """

    def __init__(self, artifact: str | Path, config: ServiceConfig | None = None, *, name: str | None = None):
        from ..runtime import OrtBackend, load_backend
        from ..sources import checkpoint_stem

        self.config = config or ServiceConfig()
        self.path = Path(artifact)
        self.name = name or checkpoint_stem(self.path)
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
        self.task = served_task(backend_arch(self.backend))
        check_servable(self.task, card, str(self.path))
        self.default_budget = self._default_budget(card)
        self.predictor = self._predictor(card)
        calibration = card.inference.get("calibration") or {}
        #: the iterations an image takes on average under the card's budget (the admission estimate)
        self.mean_iterations = float(calibration.get("mean_iterations") or self.default_budget["max_iters"])
        self.capacity, self.overhead, self.post_s_per_pixel = self._measure_speed()
        self.admission = Admission(self.capacity, self.config.deadline_ms / 1000, self.config.client_share) \
            if self.config.admission else None
        self.categories = [dict(c) for c in self.predictor.categories]
        # Only ONNX Runtime on CPU with one intra-op thread computes each sample of a batch exactly as
        # alone (measured: with 2 threads the bundled model's heads moved by ~2e-6 between batch sizes).
        self.batch_invariant = (
            isinstance(self.backend, OrtBackend)
            and self.backend.threads == 1
            and self.backend.providers == ["CPUExecutionProvider"]
        )
        self.limits = self.config.limits()
        self.scheduler = self._scheduler()

    def _predictor(self, card: ModelCard) -> PanopticPredictor:
        """The predictor of this model's task, over this backend with the card's budget and trained scale."""
        common = {"stride": self.backend.size_multiple, "budget": self.default_budget, "trained": trained_scale(card),
                  "scale": self.config.scale}
        if self.task == "pathfinder":
            from .mask import MaskPredictor

            return MaskPredictor(self.backend.run, in_channels=self.backend.in_channels, **common)
        return PanopticPredictor(self.backend.run, card.categories, postprocess_config=card.postprocess, **common)

    def _default_budget(self, card: ModelCard) -> dict[str, Any]:
        # a fixed-count card: serve early exit with the artifact's defaults (else the default budget)
        budget = self.backend.budget_for(card.budget).kwargs()
        if budget["max_iters"] > self.config.max_iters_limit:
            raise ConfigError(
                f"max_iters_limit={self.config.max_iters_limit} is below the model's default "
                f"max_iters={budget['max_iters']}; raise the limit"
            )
        return budget

    def _scheduler(self):
        """S's iteration-level scheduler where this artifact can be stepped (a checkpoint, or an .onnx with its
        pieces: `export --pieces`, which `package` writes), else None: then the deadline is fitted up front."""
        from ..runtime.stepper import load_stepper
        from .scheduler import Scheduler

        if self.backend.name not in ("torch", "onnxruntime") or self.config.precision != "fp32":
            return None
        try:
            stepper = load_stepper(getattr(self.backend, "model", None) or self.path, self.backend.name,
                                   self.config.threads)
        except CrbpError as exc:
            log.info("no stepper for %s (%s): the deadline bounds iterations up front", self.path.name, exc)
            return None
        # rows share a step only where the runtime computes each row as alone (see the module docstring): an
        # answer must not depend on who else was asking; one slot still gives the wall-clock stop at a deadline
        return Scheduler(stepper, slots=8 if self.batch_invariant else 1, mode="iteration", max_queue=64)

    def _measure_speed(self) -> tuple[float, float, float]:
        """(pixel-iterations per second, encoder + readout in steps, postprocess seconds per pixel) of this
        worker, from short runs of a noise image at the trained scale (after a warm-up). Noise after one step
        is the postprocess's worst case (many fragments). `capacity` in the config overrides the speed."""
        side = self.predictor.trained or 64
        side += (-side) % self.backend.size_multiple
        image = np.random.default_rng(0).random((1, self.predictor.in_channels, side, side), dtype=np.float32)
        times, steps, pixels = [], [], side * side
        for n in (1, 1, 4):
            budget = Budget.from_dict(self.default_budget).merge({"max_iters": n, "tol": 0.0}).kwargs()
            started = time.perf_counter()
            out = self.backend.run(image, **budget).outputs
            times.append(time.perf_counter() - started)
            steps.append(int(np.asarray(out["iterations"]).reshape(-1)[0]))
            if n == 1:
                started = time.perf_counter()
                self.predictor.decode(out, (side, side), budget, 0.0)
                post = (time.perf_counter() - started) / pixels
        (t1, t4), (n1, n4) = times[1:], steps[1:]
        step = (t4 - t1) / (n4 - n1) if n4 > n1 and t4 > t1 else t1 / 2.5
        overhead = min(10.0, max(0.0, t1 / step - n1))
        log.info("measured %.3g pixel-iterations/s, encoder + readout = %.2f steps, postprocess %.3g us/pixel",
                 pixels / step, overhead, post * 1e6)
        return self.config.capacity or pixels / step, overhead, post

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.name,
            "task": self.task,
            "artifact": self.path.name,
            "backend": self.backend.name,
            "strategy": self.backend.strategy,
            "default_budget": self.default_budget,
            "max_iters_limit": self.config.max_iters_limit,
            "batch_invariant": self.batch_invariant,
            "limits": self.limits.to_dict(),
            "max_cost": self.config.max_cost,
            "deadline_ms": self.config.deadline_ms,
            "scale": self.config.scale,
            "trained_scale": self.predictor.trained,
            "capacity": round(self.capacity),
            "admission": self.config.admission,
        }

    # --- requests -----------------------------------------------------------------------------
    def resolve_budget(self, fields: Mapping[str, Any], headers: Mapping[str, Any]) -> tuple[dict, dict, bool]:
        """(budget to run, what was requested, clamped?) from fields or X-Max-Iters / X-Tol headers."""
        lower = {str(k).lower(): v for k, v in headers.items()}
        requested: dict[str, Any] = {}
        for key in BUDGET_FIELDS:
            text = _given(fields, lower, key, BUDGET_HEADERS[key])
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
        unknown = sorted(set(fields) - {*IMAGE_FIELDS, *BUDGET_FIELDS, *REQUEST_FIELDS, *IGNORED_FIELDS})
        if unknown:
            raise RequestError(
                f"unknown parameter(s) {', '.join(map(repr, unknown))}; accepted: max_iters, tol, threshold, patience, "
                f"deadline_ms, scale (or headers X-Max-Iters, X-Tol, X-Threshold, X-Patience, X-Deadline-Ms, X-Scale) "
                f"and the image"
            )
        budget, requested, clamped = self.resolve_budget(fields, raw.headers)
        deadline_ms, scale, client = self.request_options(fields, raw.headers)
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
            image = to_channels(decode_image(data, name="image", limits=self.limits), self.predictor.in_channels)
        except InputError as exc:
            raise RequestError(str(exc)) from None
        size = image.shape[:2]
        image = resize_image(image, self.predictor.working_size(*size, scale))
        decode_ms = 1000 * (time.perf_counter() - started)
        parsed = Parsed(image, budget, requested, clamped, decode_ms, size=size, scale=scale,
                        deadline=time.monotonic() + deadline_ms / 1000, deadline_ms=deadline_ms, client=client)
        return self.bound(parsed)

    def request_options(self, fields: Mapping[str, Any], headers: Mapping[str, Any]) -> tuple[float, str, str]:
        """(deadline in ms, clamped to the server's; scale policy; client key) of one request."""
        lower = {str(k).lower(): v for k, v in headers.items()}
        deadline_ms: float = self.config.deadline_ms
        text = _given(fields, lower, "deadline_ms", REQUEST_HEADERS["deadline_ms"])
        if text is not None:
            value = _number("deadline_ms", text)
            if not (math.isfinite(value) and value > 0):
                raise RequestError(f"deadline_ms must be a number of milliseconds > 0, got {text.strip()!r}")
            deadline_ms = min(value, deadline_ms)  # a longer deadline than the server's is clamped, like max_iters
        scale = (_given(fields, lower, "scale", REQUEST_HEADERS["scale"]) or self.config.scale).strip().lower()
        if scale not in SCALES:
            raise RequestError(f"scale must be one of {', '.join(SCALES)} (X-Scale), got {scale!r}")
        return deadline_ms, scale, client_of(headers)

    def bound(self, parsed: Parsed) -> Parsed:
        """Lower max_iters to what the cost cap and the deadline allow at the working size; 413 when not even
        one step fits either. Sets the request's estimated cost for admission."""
        h, w = parsed.image.shape[:2]
        pixels = h * w
        by_cost = self.config.max_cost // pixels
        seconds = parsed.deadline_ms / 1000 * DEADLINE_MARGIN - self.post_s_per_pixel * pixels
        by_deadline = math.floor(self.capacity * seconds / pixels - self.overhead)
        if by_cost < 1 or by_deadline < 1:
            what = (f"the cost cap of {self.config.max_cost} pixel-iterations" if by_cost < 1 else
                    f"the {parsed.deadline_ms:g} ms deadline (one step here takes ~{1000 * pixels / self.capacity:.0f} ms, "
                    f"encoder and readout ~{self.overhead:.1f} steps, grouping ~{1000 * self.post_s_per_pixel * pixels:.0f} ms)")
            hint = " at scale=card (X-Scale: card)" if parsed.scale == "native" and self.predictor.trained else " smaller"
            raise RequestError(f"a {h}x{w} image cannot get even one solver step within {what}; send it{hint}", 413)
        budget = dict(parsed.budget)
        runs = budget.get("max_iters", budget.get("iters", 1))
        # with a scheduler the deadline is a wall-clock stop: only the cost cap lowers max_iters up front
        limit = min(by_cost, by_deadline) if self.scheduler is None else by_cost
        if limit < runs:
            parsed.bound = "budget" if by_cost <= by_deadline else "deadline"
            budget["max_iters" if "max_iters" in budget else "iters"] = limit
            parsed.budget = budget
        steps = min(limit, runs) if parsed.requested else min(limit, runs, self.mean_iterations)
        parsed.cost = pixels * (steps + self.overhead)
        return parsed

    def run(self, parsed: Sequence[Parsed]) -> list[Reply]:
        """Predict valid requests: one model call per (budget, size) group; a failing group fails alone.
        Where the artifact steps (a checkpoint: runtime.stepper), the scheduler runs them instead, and the
        deadline is a wall-clock stop rather than the iterations estimated to fit it."""
        if self.scheduler is not None:
            return self._run_scheduled(parsed)
        replies: list[Reply | None] = [None] * len(parsed)
        for chunk in self._chunks(parsed):
            started = time.perf_counter()
            try:
                budget = self._fit([parsed[i] for i in chunk])
                preds = self.predictor.predict([parsed[i].image for i in chunk], scale="native", **budget)
            except RequestError as exc:  # out of time before its turn came: refused, not late
                for i in chunk:
                    replies[i] = refusal(exc)
                continue
            except Exception as exc:  # the runtime's own failures: answer 500 for this group only
                log.exception("inference failed for %d request(s)", len(chunk))
                for i in chunk:
                    replies[i] = error_reply(500, f"inference failed: {exc}")
                continue
            self.observe([parsed[i] for i in chunk], preds, time.perf_counter() - started)
            for i, pred in zip(chunk, preds):
                replies[i] = self.reply_for(parsed[i], pred, batch=len(chunk))
        return replies  # type: ignore[return-value]

    def _chunks(self, parsed: Sequence[Parsed]) -> list[list[int]]:
        """Model calls: requests of one budget and working size together (where batching is exact), cheapest first."""
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(parsed):
            groups.setdefault((tuple(sorted(p.budget.items())), p.image.shape[:2]), []).append(i)
        chunks = [g for members in groups.values() for g in ([members] if self.batch_invariant else [[i] for i in members])]
        return sorted(chunks, key=lambda c: sum(parsed[i].cost for i in c))

    def _fit(self, chunk: Sequence[Parsed]) -> dict[str, Any]:
        """The chunk's budget, its max_iters lowered to what fits before its earliest deadline now (a request
        that waited behind others in its batch has less time); 503 when not one step fits any more."""
        budget = dict(chunk[0].budget)
        pixels = sum(p.image.shape[0] * p.image.shape[1] for p in chunk)
        remaining = min(p.deadline for p in chunk) - time.monotonic() if chunk[0].deadline else math.inf
        seconds = remaining * DEADLINE_MARGIN - self.post_s_per_pixel * pixels
        allowed = math.floor(self.capacity * seconds / pixels - self.overhead) if math.isfinite(remaining) else None
        if allowed is not None and allowed < 1:
            raise Overloaded(f"this request waited past its {chunk[0].deadline_ms:g} ms deadline behind others in its "
                             "batch; retry", 503, retry_after_s=1.0)
        if allowed is not None and allowed < budget.get("max_iters", 0):
            budget["max_iters"] = allowed
            for p in chunk:
                p.bound, p.budget = "deadline", budget
        return budget

    def admit(self, parsed: Parsed) -> Parsed:
        """Charge the request's estimated cost, or raise Overloaded: 503 at capacity, 429 over the client's share."""
        if self.admission is not None:
            self.admission.admit(parsed.cost, parsed.client)
        return parsed

    def accept(self, raw: RawRequest) -> Parsed:
        """Screen (a client over its share is refused from its headers), parse and admit one request:
        what every engine calls before running it. Raises RequestError / Overloaded."""
        if self.admission is not None:
            self.admission.screen(client_of(raw.headers))
        return self.admit(self.parse(raw))

    def settle(self, answered: Sequence[tuple[Parsed, Prediction]], started: float, ended: float) -> None:
        """After a handler call from `started` to `ended` (time.monotonic): teach admission the worker's real
        throughput (decode to encode) and how busy it is. Engines that run requests themselves call it too."""
        if self.admission is None:
            return
        if not self.config.capacity:
            work = self.work([p for p, _ in answered], [q for _, q in answered])
            self.admission.observe(work, ended - started)
        self.admission.record(started, ended)

    def handle(self, requests: Sequence[RawRequest]) -> list[Reply]:
        """Accept every request, run the admitted ones together; a bad request never fails the others."""
        started = time.monotonic()
        replies: list[Reply | None] = [None] * len(requests)
        valid: list[tuple[int, Parsed]] = []
        for i, raw in enumerate(requests):
            try:
                valid.append((i, self.accept(raw)))
            except RequestError as exc:
                replies[i] = refusal(exc)
            except Exception as exc:  # a bug, not the client's fault; the others still get answers
                log.exception("request %d could not be parsed", i)
                replies[i] = error_reply(500, f"internal error while reading the request: {exc}")
        for (i, _), reply in zip(valid, self.run([p for _, p in valid])):
            replies[i] = reply
        answered = [(p, replies[i].prediction) for i, p in valid if replies[i].prediction is not None]
        self.settle(answered, started, time.monotonic())
        return replies  # type: ignore[return-value]

    def _run_scheduled(self, parsed: Sequence[Parsed]) -> list[Reply]:
        """Every request in the scheduler's slots at once; each stops at its deadline or cost cap at the latest.
        A request refused at submit or by the scheduler gets its own refusal; a failure is a 500 for it alone."""
        started = time.perf_counter()
        tickets: list[Any] = []
        for p in parsed:
            pixels = p.image.shape[0] * p.image.shape[1]
            # the scheduler's stop leaves room for the readout and the grouping after it
            room = self.post_s_per_pixel * pixels + self.overhead * pixels / self.capacity
            try:
                tickets.append(self.scheduler.submit(p.image, p.budget, max_cost=self.config.max_cost,
                                                     deadline=p.deadline - room))
            except RequestError as exc:
                tickets.append(exc)
        self.scheduler.run_all([t for t in tickets if not isinstance(t, RequestError)])  # errors stay in tickets
        replies, done = [], []
        for p, ticket in zip(parsed, tickets):
            try:
                if isinstance(ticket, RequestError):
                    raise ticket
                pred = self.prediction_of(p, ticket.result())
            except RequestError as exc:  # refused (413, 503 with Retry-After): the client's answer, not a failure
                replies.append(refusal(exc))
                continue
            except Exception as exc:  # this request's failure alone
                log.exception("inference failed for one request")
                replies.append(error_reply(500, f"inference failed: {exc}"))
                continue
            done.append((p, pred))
            replies.append(self.reply_for(p, pred, batch=1))  # each row steps as it would alone
        if done:  # requests share the ticks: the speed is all their work over the whole run
            self.observe([p for p, _ in done], [q for _, q in done], time.perf_counter() - started)
        return replies

    def prediction_of(self, parsed: Parsed, outcome) -> Prediction:
        """The Prediction for one request the scheduler finished (its heads post-processed as in a whole run)."""
        out = {**outcome.heads, "iterations": np.array([outcome.iterations]),
               "residual": np.array([outcome.residual], dtype=np.float32), "stopped": [outcome.stopped]}
        model_ms = sum(outcome.timings.get(k, 0.0) for k in ("encode_ms", "step_ms", "readout_ms"))
        return self.predictor.decode(out, parsed.image.shape[:2], parsed.budget, model_ms)[0]

    def work(self, parsed: Sequence[Parsed], preds: Sequence[Prediction]) -> float:
        """Pixel-iterations the model spent on these answers (encoder and readout as `overhead` steps)."""
        return sum(p.image.shape[0] * p.image.shape[1] * (q.iterations + self.overhead) for p, q in zip(parsed, preds))

    def observe(self, parsed: Sequence[Parsed], preds: Sequence[Prediction], seconds: float) -> None:
        """Learn the speed the deadline fits iterations to from one model call: a slow-down at once (a
        loaded machine must not make the next answer late), a speed-up slowly; likewise the grouping time."""
        work = self.work(parsed, preds)
        if work > 0 and seconds > 0 and not self.config.capacity:
            self.capacity = min(work / seconds, 0.9 * self.capacity + 0.1 * work / seconds)
        pixels = sum(p.image.shape[0] * p.image.shape[1] for p in parsed)
        post = sum(q.timings_ms.get("postprocess", 0.0) for q in preds) / 1000 / max(1, pixels)
        if post > 0:
            self.post_s_per_pixel = max(post, 0.9 * self.post_s_per_pixel + 0.1 * post)

    def reply_for(self, parsed: Parsed, pred: Prediction, batch: int) -> Reply:
        """The 200 reply for one parsed request and its prediction (any engine or scheduler may call it): the
        answer mapped back to the original pixels, a stop at a lowered max_iters named by its limit."""
        if parsed.size != (0, 0):
            pred = restore(pred, parsed.size)
        if parsed.bound and pred.stopped == "cap" and pred.iterations >= parsed.budget.get("max_iters", 0):
            pred.stopped = parsed.bound
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
            "budget": {**parsed.budget, "clamped": parsed.clamped, "requested": parsed.requested,
                       "deadline_ms": parsed.deadline_ms, "max_cost": self.config.max_cost},
            "scale": {"policy": parsed.scale, "ran_at": [int(parsed.image.shape[0]), int(parsed.image.shape[1])]},
            "batch_size": batch,
            "timings_ms": timings,
        }
        return Reply(200, body, prediction=pred, max_iters=parsed.budget["max_iters"], timings_ms=timings)
