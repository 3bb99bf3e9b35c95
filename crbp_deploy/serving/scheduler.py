"""Iteration-level scheduling: requests join and leave the running batch between solver steps.

A server that batches whole requests (TorchServe, Ray Serve, Triton's dynamic batcher) returns a batch
when its slowest image is done. A fixed-point model allows better (Orca / vLLM's iteration-level
scheduling): a fixed number of slots each hold one request's solver state; each `tick()` runs ONE
`advance` over the occupied slots of one lane; a request whose halting decision fires leaves at once
with its answer; waiting requests are encoded into the free slots. Answers do not depend on who else
was in the batch: each row's step is the solo run's step (runtime/stepper.py).

Choices, and why:
- Lanes. Rows that share a step must have one image size (one tensor) and one stepper group (the
  torch stepper takes tol/threshold/patience per row, so only the halting policy must match; an ONNX
  step takes the whole budget as scalars). A lane is (padded size, group).
- Which lane steps: the one that has had the least step time per request so far (fair queueing by
  compute, a new lane starting level with the least-served one). Round-robin by ticks would give a
  lane of 1024 px images 64x the compute of a 128 px lane; oldest-first would let one long request's
  lane take every tick.
- Anytime stops, checked every tick for every slot: at its `deadline` (in the scheduler's clock) or when
  the next step would pass its `max_cost` (pixel-iterations, H x W x iterations of the image as given),
  a request leaves with the readout of its current state, `stopped` = "deadline" / "budget". A solver
  stop (converged, policy, cap, diverged, fixed) in the same tick wins. A `max_cost` below one step
  is refused at submit (413).
- Which rows of the lane step (`priority`, iteration mode). Where a step costs the same per row whatever
  the batch (measured on CPU: 23.5 ms per row at 1 slot, 27.5 at 8), stepping every row is processor
  sharing: an easy scene that joins ten hard ones advances at a tenth of the speed. "fewest-steps" steps
  only the rows that have run the fewest steps (least attained service: a new request runs alone until it
  has caught up, so easy scenes leave first) at the same total work. Where a batch step is nearly free
  (a GPU), "all" keeps the rows together. "auto" picks "all" on CUDA, else "fewest-steps". Either way a
  row's step is its solo step, so the answers do not change.
- `mode="request"` emulates request-level batching for comparison: a batch (up to `slots` waiting
  requests) is admitted only when every slot is free, and its answers are released together when its
  slowest member is done; only a deadline (a promise about time) releases an answer before that.
- The waiting queue is bounded: a submit past `max_queue` raises Overloaded (503, Retry-After), and a
  request whose deadline passes before a slot is free is refused then (503: it has no state to answer
  from). Nothing is dropped silently: every submitted request ends with an answer or its error.

Drivers: `start()` / `stop()` run a background thread that ticks while there is work (it sleeps on a
condition when idle); `run_all(tickets)` ticks in the caller's thread (a handler with no thread of its
own). `submit` is thread-safe; `Ticket.result(timeout)` blocks; `await ticket` for asyncio.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterable, Mapping

import numpy as np

from ..budget import Budget
from ..errors import CrbpError, InputError, Overloaded, RequestError
from ..runtime.stepper import State, Stepper

MODES = ("iteration", "request")
#: Which rows of a lane a tick steps (iteration mode): every row, or only those with the fewest steps so far.
PRIORITIES = ("auto", "fewest-steps", "all")
MAX_SLOTS = 1024
log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """One request's answer: heads {name: 1 x C x H x W} cropped to the image, the iterations it ran, its
    last residual, why it stopped, and where its time went (ms)."""

    heads: dict[str, np.ndarray]
    iterations: int
    residual: float
    stopped: str  # converged | policy | cap | diverged | fixed | deadline | budget
    timings: dict[str, float]
    key: str | None = None


class Ticket:
    """A submitted request's handle: `result(timeout)` blocks, `await ticket` suspends, `future` is the
    underlying concurrent.futures.Future (its exception is the request's error). Cancelling it (or the
    asyncio task awaiting it) frees its slot."""

    def __init__(self, key: str | None = None):
        self.key = key
        self.future: concurrent.futures.Future = concurrent.futures.Future()

    def done(self) -> bool:
        return self.future.done()

    def cancel(self) -> bool:
        """Give up on this request: it leaves the queue or its slot at the next tick (False if answered)."""
        return self.future.cancel()

    def result(self, timeout: float | None = None) -> Outcome:
        return self.future.result(timeout)

    def __await__(self):
        return asyncio.wrap_future(self.future).__await__()

    def __repr__(self) -> str:
        return f"Ticket(key={self.key!r}, done={self.done()})"


@dataclass(eq=False)
class _Request:
    ticket: Ticket
    image: np.ndarray  # 1 x C x H' x W', padded to the stride
    size: tuple[int, int]  # the image's own H, W
    budget: Budget
    deadline: float | None
    max_cost: float | None
    submitted: float = field(default_factory=time.perf_counter)
    admitted: float | None = None
    state: State | None = None
    lane: Hashable = None
    timings: dict[str, float] = field(default_factory=lambda: {"queue_ms": 0.0, "encode_ms": 0.0, "step_ms": 0.0,
                                                               "readout_ms": 0.0})

    @property
    def pixels(self) -> int:
        return self.size[0] * self.size[1]


def _number(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{name} must be a finite number or None, got {value!r}")
    return float(value)


def _count(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InputError(f"{name} must be an integer in {low}..{high}, got {value!r}")
    return value


def _settle(future: concurrent.futures.Future, value: Outcome | BaseException) -> None:
    """Answer a ticket unless its client cancelled it (which may happen in another thread at any time)."""
    try:
        if isinstance(value, BaseException):
            future.set_exception(value)
        else:
            future.set_result(value)
    except concurrent.futures.InvalidStateError:  # cancelled (or answered) meanwhile: nobody waits for it
        pass


def _settled(future: concurrent.futures.Future) -> Outcome | BaseException:
    if future.cancelled():
        return concurrent.futures.CancelledError()
    return future.exception() or future.result()


def _resolve_priority(stepper: Stepper) -> str:
    """"all" where a batched step is nearly free (CUDA), else "fewest-steps"."""
    device = str(getattr(stepper, "device", "cpu"))
    providers = getattr(stepper, "providers", None) or []
    on_gpu = device.startswith("cuda") or any(p in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
                                              for p in providers)
    return "all" if on_gpu else "fewest-steps"


class Scheduler:
    """Holds requests in `slots` and steps them one solver step per `tick()` (see the module docstring)."""

    def __init__(self, stepper: Stepper, *, slots: int = 8, mode: str = "iteration", max_queue: int = 64,
                 priority: str = "auto", clock: Callable[[], float] = time.monotonic):
        if not isinstance(stepper, Stepper):
            raise InputError(f"Scheduler needs a Stepper (runtime.stepper.load_stepper), got {type(stepper).__name__}")
        if mode not in MODES:
            raise InputError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if priority not in PRIORITIES:
            raise InputError(f"priority must be one of {', '.join(PRIORITIES)}, got {priority!r}")
        self.stepper, self.mode, self.clock = stepper, mode, clock
        self.priority = _resolve_priority(stepper) if priority == "auto" else priority
        self.slots = _count("slots", slots, 1, MAX_SLOTS)
        self.max_queue = _count("max_queue", max_queue, 1, 1_000_000)
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []  # at most `slots`
        self._held: list[tuple[_Request, Outcome]] = []  # request mode: answers waiting for their batch
        self._served: dict[Hashable, float] = {}  # lane -> step seconds per request so far
        self._cond = threading.Condition()
        self._tick_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._service_s = 0.0  # running mean of a request's time in a slot (for Retry-After)
        self.ticks = 0
        self.steps = self.row_steps = 0  # advances run, and the rows they stepped (their ratio: slot occupancy)

    # --- submitting ----------------------------------------------------------------------------
    def submit(self, image: np.ndarray, budget: Mapping[str, Any] | Budget | None = None, *,
               deadline: float | None = None, max_cost: float | None = None, key: str | None = None) -> Ticket:
        """Queue one H x W x C float image in [0, 1]; `budget` holds Budget keys over the stepper's default.
        InputError for a bad image or budget, RequestError 413 for a max_cost below one step, Overloaded
        (503) when the waiting queue is full."""
        request = self._request(image, budget, deadline, max_cost, key)
        with self._cond:
            if len(self._waiting) >= self.max_queue:
                raise Overloaded(f"the scheduler's queue is full ({self.max_queue} waiting); retry later",
                                 retry_after_s=self._retry_after())
            self._waiting.append(request)
            self._cond.notify_all()
        return request.ticket

    def _request(self, image, budget, deadline, max_cost, key) -> _Request:
        image = self.stepper.check_image(image)
        budget = self.stepper.budget(budget)
        deadline, max_cost = _number("deadline", deadline), _number("max_cost", max_cost)
        h, w = image.shape[:2]
        if max_cost is not None and max_cost < h * w:
            raise RequestError(f"max_cost {max_cost:g} is below one step of this {h}x{w} image ({h * w} "
                               "pixel-iterations): no answer fits the limit", status=413)
        m = self.stepper.size_multiple
        ph, pw = (-h) % m, (-w) % m
        padded = np.pad(image, ((0, ph), (0, pw), (0, 0)), mode="edge") if ph or pw else image
        chw = np.ascontiguousarray(padded.transpose(2, 0, 1)[None])
        return _Request(Ticket(key), chw, (h, w), budget, deadline, max_cost)

    def _retry_after(self) -> float:
        """Seconds until a slot is likely free for a new request: the queue ahead of it, `slots` at a time."""
        per = self._service_s or 1.0
        return round(max(0.5, per * (1 + len(self._waiting) / self.slots)), 1)

    # --- one tick ------------------------------------------------------------------------------
    def tick(self) -> bool:
        """Admit, step one lane once, finish what is done; False when there was nothing to do."""
        with self._tick_lock:
            expired = self._expire()
            admitted = self._admit()
            for request in admitted:
                self._encode(request)
            worked = expired | bool(admitted) | self._sweep()
            lane = self._pick_lane()
            if lane is not None:
                self._step(lane)
                self._sweep()
                worked = True
            self.ticks += worked
            self._release()
            return worked

    def _expire(self) -> bool:
        """Refuse (503) the waiting requests whose deadline passed before a slot was free: they have no state
        to answer from, and waiting on would answer them late."""
        now = self.clock()
        with self._cond:
            late = [r for r in self._waiting if r.deadline is not None and now >= r.deadline]
            if late:
                self._waiting = deque(r for r in self._waiting if r not in late)
        self._fail(late, Overloaded("no slot was free before this request's deadline; retry later",
                                    retry_after_s=self._retry_after()))
        return bool(late)

    def _admit(self) -> list[_Request]:
        with self._cond:  # a cancelled ticket leaves its slot first, unanswered (nobody waits for it)
            self._running = [r for r in self._running if not r.ticket.future.cancelled()]
            if self.mode == "request" and (self._running or self._held):
                return []
            admitted = []
            while self._waiting and len(self._running) + len(admitted) < self.slots:
                request = self._waiting.popleft()
                if not request.ticket.future.cancelled():  # a client that gave up takes no slot
                    admitted.append(request)
            self._running.extend(admitted)
            return admitted

    def _encode(self, request: _Request) -> None:
        started = time.perf_counter()
        request.timings["queue_ms"] = 1000 * (started - request.submitted)
        try:
            request.state = self.stepper.encode(request.image, request.budget)
            request.lane = (request.image.shape[-2:], self.stepper.group(request.budget))
        except Exception as exc:  # noqa: BLE001  (the request's own error: it goes to its ticket)
            self._fail([request], exc)
        request.timings["encode_ms"] = 1000 * (time.perf_counter() - started)
        request.admitted = started

    def _pick_lane(self) -> Hashable | None:
        """The lane with the least step time per request so far; a new lane starts level with the least."""
        lanes = {r.lane for r in self._running if r.state is not None and r.state.stopped() is None}
        for lane in list(self._served):
            if lane not in lanes:
                del self._served[lane]
        if not lanes:
            return None
        floor = min(self._served.values(), default=0.0)
        for lane in lanes:
            self._served.setdefault(lane, floor)
        return min(lanes, key=lambda lane: (self._served[lane], repr(lane)))

    def _step(self, lane: Hashable) -> None:
        batch = [r for r in self._running if r.lane == lane and r.state is not None and r.state.stopped() is None]
        if self.mode == "iteration" and self.priority == "fewest-steps":
            fewest = min(r.state.iterations for r in batch)
            batch = [r for r in batch if r.state.iterations == fewest]
        started = time.perf_counter()
        try:
            self.stepper.advance([r.state for r in batch])
        except Exception as exc:  # noqa: BLE001  (a failed step fails the requests in it, never the loop)
            self._fail(batch, exc)
            return
        seconds = time.perf_counter() - started
        self.steps, self.row_steps = self.steps + 1, self.row_steps + len(batch)
        self._served[lane] += seconds / len(batch)
        for r in batch:
            r.timings["step_ms"] += 1000 * seconds

    def _why(self, request: _Request, now: float) -> str | None:
        """Why this request stops now: the solver's reason, else its deadline or its cost cap."""
        state = request.state
        reason = state.stopped()
        if reason is None and request.deadline is not None and now >= request.deadline:
            reason = "deadline"
        next_cost = (state.iterations + 1) * request.pixels
        if reason is None and request.max_cost is not None and next_cost > request.max_cost:
            reason = "budget"
        return reason

    def _sweep(self) -> bool:
        """Finish every running request that is done (read out, answered or held); True if any."""
        now = self.clock()
        done = [(r, why) for r in list(self._running) if r.state is not None and (why := self._why(r, now))]
        for request, why in done:
            try:
                outcome = self._readout(request, why)
            except Exception as exc:  # noqa: BLE001
                self._fail([request], exc)
                continue
            with self._cond:
                self._running.remove(request)
                self._held.append((request, outcome))
            if why == "deadline":  # at once in both modes (held in request mode, it is answered already)
                self._answer(request, outcome)
        return bool(done)

    def _readout(self, request: _Request, why: str) -> Outcome:
        started = time.perf_counter()
        (h, w), padded = request.size, tuple(request.image.shape[-2:])
        heads = {k: v[..., :h, :w] if tuple(v.shape[-2:]) == padded else v  # a head at another resolution: as is
                 for k, v in self.stepper.readout(request.state).items()}
        request.timings["readout_ms"] = 1000 * (time.perf_counter() - started)
        state = request.state
        return Outcome(heads, state.iterations, state.residual, why, request.timings, request.ticket.key)

    def _release(self, force: bool = False) -> None:
        """Answer the finished requests: at once, or (request mode) when the whole batch is done."""
        with self._cond:
            if not self._held or (self.mode == "request" and self._running and not force):
                return
            held, self._held = self._held, []
        for request, outcome in held:
            self._answer(request, outcome)

    def _answer(self, request: _Request, outcome: Outcome) -> None:
        if request.ticket.future.done():
            return
        now = time.perf_counter()
        outcome.timings["total_ms"] = 1000 * (now - request.submitted)
        in_slot = now - (request.admitted or request.submitted)
        self._service_s = in_slot if not self._service_s else 0.9 * self._service_s + 0.1 * in_slot
        _settle(request.ticket.future, outcome)

    def _fail(self, requests: list[_Request], exc: BaseException) -> None:
        if not isinstance(exc, CrbpError):
            log.exception("scheduler: a request failed", exc_info=exc)
            exc = CrbpError(f"the model failed on this request: {type(exc).__name__}: {exc}")
        with self._cond:
            for request in requests:
                if request in self._running:
                    self._running.remove(request)
                request.state = None
                _settle(request.ticket.future, exc)

    # --- drivers -------------------------------------------------------------------------------
    def pending(self) -> int:
        """Requests not yet answered: waiting, in slots, or held for their batch."""
        with self._cond:
            return len(self._waiting) + len(self._running) + len(self._held)

    def snapshot(self) -> dict[str, Any]:
        """The load right now (what an admission policy reads)."""
        with self._cond:
            return {"mode": self.mode, "priority": self.priority, "slots": self.slots, "running": len(self._running),
                    "waiting": len(self._waiting), "max_queue": self.max_queue, "ticks": self.ticks,
                    "steps": self.steps, "rows_per_step": self.row_steps / self.steps if self.steps else 0.0,
                    "lanes": len({r.lane for r in self._running if r.lane is not None}),
                    "waiting_pixels": sum(r.pixels for r in self._waiting),
                    "running_pixels": sum(r.pixels for r in self._running)}

    def run_all(self, tickets: Iterable[Ticket], timeout: float | None = None) -> list[Outcome | BaseException]:
        """Tick in this thread (or wait on the background loop) until `tickets` are answered. Like
        `asyncio.gather(return_exceptions=True)`: each ticket's Outcome, or its error in its place (a
        request's failure is never raised here, so it cannot fail the others of a handler's batch).
        TimeoutError when not all are answered within `timeout` s."""
        tickets = list(tickets)
        if self._thread is not None and self._thread.is_alive():
            if concurrent.futures.wait([t.future for t in tickets], timeout).not_done:
                raise TimeoutError(f"run_all: not done within {timeout} s")
        else:
            end = None if timeout is None else time.perf_counter() + timeout
            while not all(t.done() for t in tickets):
                if not self.tick() and not all(t.done() for t in tickets):
                    raise CrbpError("run_all: tickets that this scheduler does not hold")
                if end is not None and time.perf_counter() > end:
                    raise TimeoutError(f"run_all: not done within {timeout} s")
        return [_settled(t.future) for t in tickets]

    def start(self) -> "Scheduler":
        """Tick in a background thread while there is work (idle: asleep on a condition)."""
        with self._cond:
            if self._thread is not None and self._thread.is_alive():
                return self
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="crbp-scheduler", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not (self._waiting or self._running or self._held):
                    self._cond.wait()
                if self._stopping:
                    return
            try:
                idle = not self.tick()
            except Exception:  # noqa: BLE001  (tick fails requests, not itself; never let the loop die)
                log.exception("scheduler: tick failed")
                idle = True
            if idle:  # work that cannot move this instant: never a busy spin
                with self._cond:
                    self._cond.wait(0.01)

    def stop(self, timeout: float | None = 30.0) -> None:
        """Finish the work in hand (up to `timeout` s), stop the thread; what is left is refused (503)."""
        end = None if timeout is None else time.perf_counter() + timeout
        while self.pending() and (end is None or time.perf_counter() < end):
            if self._thread is None or not self._thread.is_alive():
                self.tick()
            else:
                time.sleep(0.005)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()
        self._thread = None
        with self._cond:
            left = list(self._waiting) + self._running
            self._waiting.clear()
        self._release(force=True)  # answers held for an unfinished batch go out now
        self._fail(left, Overloaded("the scheduler stopped before this request was answered", retry_after_s=1.0))

    def __enter__(self) -> "Scheduler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
