"""Admission control and backpressure for the router.

A request is admitted straight into flight while there is room, otherwise it may wait in a bounded
FIFO queue; beyond that it is rejected at once with a retry hint, so overload turns into fast
RESOURCE_EXHAUSTED / 429 answers instead of unbounded latency and memory.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Literal


@dataclass(frozen=True)
class Rejected:
    """The answer when the router is full: retry after ``retry_after_s`` seconds (a hint)."""

    retry_after_s: float
    reason: str


class Admission:
    """One admitted request's place: ``queued`` until a slot frees, then ``running``, then ``released``.

    Use ``async with admission:`` (waits for its slot, releases on exit) or :meth:`wait` and
    :meth:`release`. :meth:`release` is idempotent and must be called once the request is done,
    whatever the outcome; a waiter cancelled while queued gives up its place by itself.
    """

    def __init__(self, controller: AdmissionController, running: bool) -> None:
        self._controller = controller
        self.state: Literal["queued", "running", "released"] = "running" if running else "queued"
        self._ready: asyncio.Future[None] | None = None  # created when someone waits while queued

    async def wait(self) -> None:
        """Return once this request holds an in-flight slot."""
        if self.state == "queued":
            self._ready = asyncio.get_running_loop().create_future()
            try:
                await self._ready
            except asyncio.CancelledError:
                # Whether or not the slot was handed over meanwhile, release() gives it back.
                self.release()
                raise
        if self.state != "running":
            raise RuntimeError(f"admission is {self.state}")

    def release(self) -> None:
        self._controller._release(self)

    def _promote(self) -> None:
        self.state = "running"
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(None)

    async def __aenter__(self) -> Admission:
        await self.wait()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()


class AdmissionController:
    """Bounds the requests one router holds: at most ``max_in_flight`` running on replicas and at
    most ``max_queued`` waiting for a running slot.

    Invariants: ``0 <= in_flight <= max_in_flight`` and ``0 <= queued <= max_queued``; a request is
    queued only while every in-flight slot is taken, because a freed slot goes straight to the
    oldest waiter (FIFO), never back to the pool while someone waits.

    Not thread-safe, on purpose: it lives on one asyncio event loop and never awaits while changing
    its counts, so no lock is needed. ``clock`` is injectable for tests.
    """

    def __init__(self, max_queued: int, max_in_flight: int, *, min_retry_after_s: float = 0.1,
                 max_retry_after_s: float = 10.0, rate_window_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_in_flight < 1 or max_queued < 0:
            raise ValueError("need max_in_flight >= 1 and max_queued >= 0")
        self.max_queued = max_queued
        self.max_in_flight = max_in_flight
        self.min_retry_after_s = min_retry_after_s
        self.max_retry_after_s = max_retry_after_s
        self.rate_window_s = rate_window_s
        self._clock = clock
        self._in_flight = 0
        self._queue: deque[Admission] = deque()
        self._completions: deque[float] = deque()  # release times of running requests, within the window
        self.rejected = 0

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def queued(self) -> int:
        return len(self._queue)

    def try_admit(self) -> Admission | Rejected:
        """Admit into flight if a slot is free, else into the queue if it has room, else reject."""
        if self._in_flight < self.max_in_flight:
            self._in_flight += 1
            return Admission(self, running=True)
        if len(self._queue) < self.max_queued:
            admission = Admission(self, running=False)
            self._queue.append(admission)
            return admission
        self.rejected += 1
        return Rejected(self.retry_after_s(),
                        f"overloaded: {self._in_flight} in flight, {len(self._queue)} queued")

    def retry_after_s(self) -> float:
        """How long until a new request would likely get a place, clamped to the floor/ceiling.

        A newcomer needs ``queued + 1`` completions; the rate is completions over the last
        ``rate_window_s`` divided by the whole window (so it underestimates just after start, which
        errs towards a longer wait). No completion in the window: the ceiling.
        """
        self._prune(self._clock())
        if not self._completions:
            return self.max_retry_after_s
        rate = len(self._completions) / self.rate_window_s
        estimate = (len(self._queue) + 1) / rate
        return min(self.max_retry_after_s, max(self.min_retry_after_s, estimate))

    def expected_wait_s(self) -> float | None:
        """How long the last request in the queue will likely wait for its slot, at the completion
        rate of the last ``rate_window_s`` (see retry_after_s); None without a completion to go by."""
        self._prune(self._clock())
        if not self._completions:
            return None
        return len(self._queue) * self.rate_window_s / len(self._completions)

    def _prune(self, now: float) -> None:
        while self._completions and self._completions[0] < now - self.rate_window_s:
            self._completions.popleft()

    def _release(self, admission: Admission) -> None:
        if admission.state == "released":
            return
        if admission.state == "queued":
            self._queue.remove(admission)
        else:
            now = self._clock()
            self._completions.append(now)
            self._prune(now)
            self._in_flight -= 1
            if self._queue:  # hand the slot over, keeping the FIFO invariant
                self._in_flight += 1
                self._queue.popleft()._promote()
        admission.state = "released"
