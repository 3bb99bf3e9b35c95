"""Admission control: refuse, up front and cheaply, the work a worker cannot finish within the deadline.

Engine-independent: `PanopticService` asks `Admission.admit` for every parsed request, whatever server
(TorchServe, Ray, Triton) delivered it. A request's cost is estimated from its working size and the
card's mean iterations, in pixel-iterations (encoder and readout counted as `overhead` steps).

Why a leaky bucket and not a queue length: a worker does not see the queue in front of it (TorchServe
holds it in its Java frontend), but it does see every request it is handed and the clock. The bucket's
level is the admitted cost not yet cleared at the worker's measured capacity (pixel-iterations per
second); admitting a request that would lift it over what the worker clears within one deadline means
that request, or one behind it, would miss its deadline. So it is refused with 503 and a Retry-After of
the time the bucket needs to drain. Refusals cost a decode, so a flood drains the server's queue at
refusal speed instead of growing it until response timeouts kill workers.

Fairness: each client named by the `X-Client-Id` header (set it in the proxy in front, from the caller's
API key or address) has its own bucket that drains at `share` of the capacity; a client whose admitted
cost would pass `share` of one deadline's work is over its share and gets 429, so one client at 10x the
sustainable rate cannot fill the worker for everyone else. The share binds only while the worker is busy
(handling requests for 75% of the last window, or its bucket past the share): a lone heavy client may
use capacity nobody else wants; among the N clients seen in the last window each may hold 1/N if that is more than `share`.
Requests without a client id are not one
client (a server without a proxy would otherwise cap all its callers together at `share`): they meet
the worker's bucket only.
"""
from __future__ import annotations

import math
import threading
import time
from collections import deque
from typing import Callable

from ..errors import Overloaded

ANONYMOUS = "anonymous"
#: Clients remembered at most; an idle client's bucket is empty and forgotten first.
MAX_CLIENTS = 4096
#: The worker counts as busy (shares bind) when it spent this much of the last window handling requests.
BUSY_UTILIZATION = 0.75


class Admission:
    """Leaky buckets over estimated cost: one for the worker, one per client."""

    def __init__(self, capacity: float, window_s: float, share: float,
                 clock: Callable[[], float] = time.monotonic):
        if not (capacity > 0 and window_s > 0 and 0 < share <= 1):
            raise ValueError(f"capacity {capacity}, window {window_s} s and share {share} must be positive")
        self.capacity = float(capacity)  # pixel-iterations per second this worker clears
        self.window_s = float(window_s)  # the deadline: admitted work must clear within it
        self.share = float(share)
        self.clock = clock
        self.level = 0.0
        self.clients: dict[str, float] = {}
        self.updated = clock()
        self.lock = threading.Lock()
        self.spans: deque[tuple[float, float]] = deque()  # (start, end) of recent handler calls
        self.seen: dict[str, float] = {}  # client -> when it last asked

    def record(self, start: float, end: float) -> None:
        """A handler call from `start` to `end` (this clock): refusals too, they cost the worker time."""
        with self.lock:
            self.spans.append((start, end))

    def utilization(self, now: float) -> float:
        """The part of the last window this worker spent in handler calls. It sees what its own bucket
        cannot: a saturated worker is handed its next request as soon as it is free, so its bucket (work
        admitted minus work cleared) stays low while the server's queue in front of it grows."""
        since = now - self.window_s
        while self.spans and self.spans[0][1] < since:
            self.spans.popleft()
        return sum(min(end, now) - max(start, since) for start, end in self.spans) / self.window_s

    def fair_share(self, client: str, now: float) -> float:
        """`share`, or 1/N of the worker among the N clients seen in the last window, if that is more."""
        self.seen[client] = now
        if len(self.seen) > MAX_CLIENTS:
            self.seen = {k: t for k, t in self.seen.items() if t >= now - self.window_s}
        active = sum(t >= now - self.window_s for k, t in self.seen.items() if k != ANONYMOUS)
        return max(self.share, 1.0 / max(1, active))

    @property
    def limit(self) -> float:
        return self.capacity * self.window_s

    def _drain(self, now: float) -> None:
        elapsed = max(0.0, now - self.updated)
        self.updated = now
        self.level = max(0.0, self.level - self.capacity * elapsed)
        active = sum(t >= now - self.window_s for k, t in self.seen.items() if k != ANONYMOUS)
        fall = self.capacity * max(self.share, 1.0 / max(1, active)) * elapsed
        self.clients = {k: v - fall for k, v in self.clients.items() if v > fall}

    def screen(self, client: str) -> None:
        """Refuse a client already over its share before its image is even decoded (a flood is refused at
        the cost of reading its headers, so the worker drains the queue in front of it faster)."""
        if client != ANONYMOUS and client in self.clients:
            self.admit(0.0, client, charge=False)

    def admit(self, cost: float, client: str = ANONYMOUS, *, charge: bool = True) -> None:
        """Charge `cost` (at most one window's work) or raise Overloaded (503 busy, 429 over share)."""
        cost = min(float(cost), self.limit)
        with self.lock:
            now = self.clock()
            self._drain(now)
            mine, share = self.clients.get(client, 0.0), self.fair_share(client, now)
            # spare capacity is anyone's (work-conserving): shares bind only on a busy worker
            busy = self.utilization(now) >= BUSY_UTILIZATION or self.level + cost > share * self.limit
            if client != ANONYMOUS and busy and mine > 0 and mine + cost > share * self.limit:
                wait = (mine + cost - share * self.limit) / (self.capacity * share)
                raise Overloaded(
                    f"client {client!r} is over its share ({share:.0%} of this worker's capacity while it is busy); "
                    f"retry after {_seconds(wait)} s", 429, _seconds(wait))
            if self.level > 0 and self.level + cost > self.limit:
                wait = (self.level + cost - self.limit) / self.capacity
                raise Overloaded(
                    f"the server is at capacity: the admitted work needs {self.level / self.capacity:.1f} s "
                    f"of the {self.window_s:.1f} s deadline; retry after {_seconds(wait)} s", 503, _seconds(wait))
            if not charge:
                return
            self.level += cost
            if client != ANONYMOUS and (len(self.clients) < MAX_CLIENTS or client in self.clients):
                # at most one window of debt: a client that ran alone on spare capacity is not locked out
                # for longer than a window once others arrive
                self.clients[client] = min(mine + cost, self.limit)

    def observe(self, cost: float, seconds: float) -> None:
        """Learn the capacity from the worker's own wall time for `cost` pixel-iterations (decode, model,
        grouping, encode: everything a request costs it), smoothed."""
        if cost > 0 and seconds > 0:
            with self.lock:
                self.capacity = 0.8 * self.capacity + 0.2 * (cost / seconds)


def _seconds(wait: float) -> float:
    """Retry-After is whole seconds (RFC 9110); at least one."""
    return float(max(1, math.ceil(wait)))
