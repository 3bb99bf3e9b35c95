"""`PanopticService` behind the iteration-level `Scheduler`: the request logic of every engine (parsing,
budget rules, admission, the COCO panoptic reply), with the model run one solver step at a time.

Ray Serve (ray_app) and Triton (triton_model) hand each request here as it arrives and get a
`concurrent.futures.Future` of its `Reply`: Ray awaits it, Triton sends the reply from its callback. The
future never fails: a refused request is already answered (4xx, 503 with Retry-After), and a model failure
is a 500 for that request only.

Why a future and not a batch: under iteration-level scheduling requests do not finish together, so there is
no batch to hand back; each answer leaves the moment its halting fires. The post-processing (grouping,
PNG encoding) runs on a small pool of its own, so the tick thread only ever steps the model.

Admission (admission.py) screens and charges each request as in `PanopticService.handle`; its capacity
stays the one measured at start (a shared step has no per-request time to learn from), and no busy spans
are recorded, so a client's share binds by the bucket's level only.

`mode="request"` runs the same path with the scheduler's request-level batching (a batch admitted when all
slots are free, answered when its slowest member is done): what benchmarks/iteration_load.py compares.
"""
from __future__ import annotations

import concurrent.futures
import logging
from dataclasses import dataclass
from typing import Callable


from ..config import StrictConfig
from ..errors import ConfigError, CrbpError, RequestError
from ..runtime.stepper import load_stepper
from .scheduler import MODES, PRIORITIES, Outcome, Scheduler
from .service import PanopticService, Parsed, RawRequest, Reply, error_reply, refusal

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerConfig(StrictConfig):
    """The scheduler a served model runs under (model-config / config.pbtxt / Ray args)."""

    mode: str = "iteration"  # iteration | request (request-level batching, for comparison)
    slots: int = 8  # requests stepped together
    priority: str = "auto"  # which rows a tick steps: fewest-steps (CPU) | all (GPU) | auto (by the device)
    max_queue: int = 64  # waiting requests beyond the slots; more are refused 503 with Retry-After
    postprocess_threads: int = 1  # grouping and PNG encoding, off the tick thread

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"scheduler mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.priority not in PRIORITIES:
            raise ConfigError(f"scheduler priority must be one of {', '.join(PRIORITIES)}, got {self.priority!r}")
        if not 1 <= self.slots <= 1024 or self.max_queue < 1 or self.postprocess_threads < 1:
            raise ConfigError(f"slots must be in 1..1024, max_queue >= 1, postprocess_threads >= 1: {self.to_dict()}")


def _done(reply: Reply) -> concurrent.futures.Future:
    future: concurrent.futures.Future = concurrent.futures.Future()
    future.set_result(reply)
    return future


class ScheduledService:
    """Answers `RawRequest`s through `service` (parse, admit, reply) and a `Scheduler` (the model's steps)."""

    def __init__(self, service: PanopticService, config: SchedulerConfig | None = None, *, stepper=None):
        self.service = service
        self.config = config or SchedulerConfig()
        if stepper is None and service.scheduler is not None:  # the service's own stepper: loaded once
            stepper = service.scheduler.stepper
        if stepper is None:
            stepper = load_stepper(service.path, _stepper_kind(service), threads=service.config.threads)
        self.scheduler = Scheduler(stepper, slots=self.config.slots, mode=self.config.mode,
                                   max_queue=self.config.max_queue, priority=self.config.priority)
        self.pool = concurrent.futures.ThreadPoolExecutor(self.config.postprocess_threads,
                                                          thread_name_prefix="crbp-postprocess")

    def start(self) -> "ScheduledService":
        self.scheduler.start()
        return self

    def stop(self, timeout: float | None = 30.0) -> None:
        """Finish the requests in hand (the rest are answered 503), then stop the threads."""
        self.scheduler.stop(timeout)
        self.pool.shutdown(wait=True)

    def submit(self, raw: RawRequest) -> concurrent.futures.Future:
        """Future of the request's Reply; it never raises (refusals and failures are replies)."""
        try:
            parsed = self.service.accept(raw)  # a client over its share is refused before decoding
            ticket = self.scheduler.submit(parsed.image, parsed.budget, deadline=parsed.deadline)
        except RequestError as exc:  # the client's problem, or Overloaded (503 / 429 with Retry-After)
            return _done(refusal(exc))
        except CrbpError as exc:
            return _done(error_reply(400, str(exc)))
        except Exception as exc:  # noqa: BLE001 - a bug, not the client's fault: this request alone fails
            log.exception("a request could not be scheduled")
            return _done(error_reply(500, f"internal error while reading the request: {exc}"))
        reply: concurrent.futures.Future = concurrent.futures.Future()
        ticket.future.add_done_callback(lambda f: self._post(parsed, f, reply))
        return reply

    def _post(self, parsed: Parsed, outcome: concurrent.futures.Future, reply: concurrent.futures.Future) -> None:
        """Runs in the tick thread: hand the post-processing to the pool (or answer at once on failure)."""
        try:
            self.pool.submit(self._finish, parsed, outcome, reply)
        except RuntimeError:  # the pool was shut down: the service is stopping
            reply.set_result(error_reply(503, "the server is stopping; retry", retry_after_s=1.0))

    def _finish(self, parsed: Parsed, outcome: concurrent.futures.Future, reply: concurrent.futures.Future) -> None:
        try:
            reply.set_result(self.reply(parsed, outcome.result()))
        except RequestError as exc:
            reply.set_result(refusal(exc))
        except Exception as exc:  # noqa: BLE001 - the request's own failure: a 500 for it, never a lost request
            if not isinstance(exc, CrbpError):
                log.exception("a scheduled request failed")
            reply.set_result(error_reply(500, f"inference failed: {exc}"))

    def reply(self, parsed: Parsed, outcome: Outcome) -> Reply:
        """The service's reply for one finished request (post-processing as in a whole-request run)."""
        answer = self.service.reply_for(parsed, self.service.prediction_of(parsed, outcome), batch=1)
        answer.body["timings_ms"]["queue"] = round(outcome.timings.get("queue_ms", 0.0), 3)
        return answer

    def answer(self, raw: RawRequest, timeout: float | None = None) -> Reply:
        """The reply, waiting in this thread (tests, a synchronous caller)."""
        return self.submit(raw).result(timeout)

    def on_reply(self, raw: RawRequest, send: Callable[[Reply], None]) -> None:
        """Call `send(reply)` once the request is answered (in a pool thread; at once for a refusal)."""
        self.submit(raw).add_done_callback(lambda f: _send(send, f.result()))


def _send(send: Callable[[Reply], None], reply: Reply) -> None:
    try:
        send(reply)
    except Exception:  # noqa: BLE001 - the client may be gone; the loop must go on
        log.exception("sending a reply failed")


def _stepper_kind(service: PanopticService) -> str:
    """The stepper runtime matching the service's backend: torch for a checkpoint, onnxruntime for a Loop."""
    return "torch" if service.path.suffix != ".onnx" else "onnxruntime"
