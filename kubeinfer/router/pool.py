"""Worker pools: how the router reaches the replicas of one model.

A pool sends a batch of jobs to one replica as one call and splits the replica's merged stream back
into one stream per job. ``kubeinfer.local.pool.LocalPool`` picks the replica itself with a routing
policy (in process, no Ray); the Ray Serve pool (``kubeinfer.serve``) leaves the pick to Serve's
request router, which runs the same policies.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from typing import AsyncIterator

from kubeinfer.router.types import Chunk, GenerateJob, ReplicaFailed, ReplicaReport, StreamItem

_DONE = object()


class JobStream:
    """The chunks of one job of a batch call. Iterate it; ``aclose()`` before the end aborts the job.

    Raises :class:`ReplicaFailed` if the call broke; ``started`` says whether any chunk arrived
    first (a job that never started is safe to retry elsewhere); ``placed`` whether the call has
    reached a replica (its first item arrived, or it ended): until then it waits for capacity
    (Serve holds a call while the deployment has no running replica, e.g. scaled to zero).
    """

    def __init__(self, call: _BatchCall, job: GenerateJob) -> None:
        self._call = call
        self.job = job
        self.queue: asyncio.Queue = asyncio.Queue()
        self.started = False
        self.finished = False
        self.closed = False

    def __aiter__(self) -> JobStream:
        return self

    @property
    def placed(self) -> bool:
        return self._call.placed.is_set()

    async def wait_placed(self) -> None:
        """Return once the call has reached a replica or ended (then iterating says how)."""
        await self._call.placed.wait()

    async def __anext__(self) -> Chunk:
        if self.finished or self.closed:
            raise StopAsyncIteration
        item = await self.queue.get()
        if isinstance(item, BaseException):
            raise item
        if item is _DONE:  # the call ended without finishing this job: the replica broke its contract
            raise ReplicaFailed("the replica's stream ended early", self._call.replica_id)
        self.started = True
        self.finished = item.finished
        return item

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        await self._call.release(self)


class _BatchCall:
    """Owns one call to one replica and the task that splits its stream into the job streams.

    Invariant: each job stream gets its chunks in order, then either a finished chunk, or an
    exception, or ``_DONE``; when every job stream is closed the call is cancelled.
    """

    def __init__(self, pool: WorkerPool, jobs: list[GenerateJob], exclude: str | None) -> None:
        self.pool = pool
        self.streams = [JobStream(self, job) for job in jobs]
        self.replica_id: str | None = None
        self.placed = asyncio.Event()  # set by the call's first item, or by its end
        # Jobs closed before the replica was known: aborted as soon as its first report names it.
        self._early_aborts: list[str] = []
        self._task = asyncio.create_task(self._pump(jobs, exclude))

    async def _pump(self, jobs: list[GenerateJob], exclude: str | None) -> None:
        try:
            async for index, item in self.pool._call(jobs, exclude):
                self.placed.set()
                if isinstance(item, ReplicaReport):
                    if self.replica_id is None:
                        self.replica_id = item.replica_id
                        self.pool._call_started(self.replica_id)
                        for request_id in self._early_aborts:
                            self.pool.spawn(self.pool.abort(self.replica_id, request_id))
                        self._early_aborts.clear()
                    self.pool.on_report(item)
                else:
                    self.streams[index].queue.put_nowait(item)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            failure = e if isinstance(e, ReplicaFailed) else ReplicaFailed(
                f"replica {self.replica_id or '?'} failed: {type(e).__name__}: {e}", self.replica_id)
            for s in self.streams:
                s.queue.put_nowait(failure)
        else:
            for s in self.streams:
                s.queue.put_nowait(_DONE)
        finally:
            self.placed.set()
            if self.replica_id is not None:
                self.pool._call_ended(self.replica_id)

    async def release(self, stream: JobStream) -> None:
        if self._task.done():
            return
        if all(s.closed for s in self.streams):
            # Cancelling the call aborts every job still live in it, on the replica (its stream's
            # contract), so no abort call is sent: after a mass disconnect, hundreds of them pinned
            # to a replica that Serve still counts as full queued up in Serve's request router and
            # stalled the gauges' refresh and new requests behind them.
            self._task.cancel()
        elif not stream.finished:
            # The others of its batch go on, so this job is aborted by itself. The caller may be
            # cancelled again while it cleans up (Starlette does that), so the abort runs as a task
            # of its own that an interruption here cannot cut short.
            if self.replica_id is not None:
                self.pool.spawn(self.pool.abort(self.replica_id, stream.job.request_id))
            else:  # aborted as soon as the call's first report names its replica
                self._early_aborts.append(stream.job.request_id)


class WorkerPool(ABC):
    """The replicas of one model, as the router sees them: sends batch calls, keeps each replica's
    last report (for routing and metrics), aborts single jobs."""

    def __init__(self) -> None:
        self.reports: dict[str, tuple[float, ReplicaReport]] = {}
        self.open_calls: dict[str, int] = {}  # replica_id -> calls of this pool streaming from it
        self._background: set[asyncio.Task] = set()  # strong references, or the loop may drop them

    def spawn(self, coro) -> None:
        """Run a clean-up coroutine (an abort) to completion whatever happens to its caller."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def open(self, jobs: list[GenerateJob], *, exclude: str | None = None) -> list[JobStream]:
        """Start one call carrying ``jobs``; ``exclude`` names a replica to avoid (a retry)."""
        return _BatchCall(self, jobs, exclude).streams

    def on_report(self, report: ReplicaReport) -> None:
        self.reports[report.replica_id] = (time.monotonic(), report)

    def fresh_reports(self, max_age_s: float = 60.0) -> list[ReplicaReport]:
        now = time.monotonic()
        return [r for t, r in self.reports.values() if now - t <= max_age_s]

    def _call_started(self, replica_id: str) -> None:
        self.open_calls[replica_id] = self.open_calls.get(replica_id, 0) + 1

    def _call_ended(self, replica_id: str) -> None:
        self.open_calls[replica_id] -= 1
        if not self.open_calls[replica_id]:
            # The last report of a call is not sent when the call is cancelled, and even when sent
            # it may predate the aborts still on their way: ask the now idle replica once more, so
            # the gauges do not keep its busy figures.
            del self.open_calls[replica_id]
            self.spawn(self._refresh(replica_id))

    # A remote replica may answer before the cancellation of the call reached it (or while its jobs
    # wind down), so a busy answer is asked again after these pauses (bounded, about a minute): often
    # at first (every 0.1 s for 3 s), when a mass disconnect is being wound down and the gauges should
    # follow within a fraction of a second, then each second. An idle answer, or a new call, ends it.
    REFRESH_RETRIES_S = (0.1,) * 30 + (0.25,) * 8 + (1.0,) * 55

    async def _refresh(self, replica_id: str) -> None:
        for pause in (*self.REFRESH_RETRIES_S, None):
            try:
                report = await self.refresh_report(replica_id)
            except Exception:  # the replica is gone, or cannot answer: drop what it said last
                report = None
            if replica_id in self.open_calls:  # a newer call reports on it now
                return
            if report is None:  # a busy figure from the past says nothing true about it now
                self.reports.pop(replica_id, None)
                return
            self.on_report(report)
            if not (report.num_requests_running or report.num_requests_waiting) or pause is None:
                return
            await asyncio.sleep(pause)

    async def refresh_report(self, replica_id: str) -> ReplicaReport | None:
        """The replica's settled load, asked for when this pool's last call to it ends; None if the
        pool cannot ask (its last report is then dropped rather than kept as its load)."""
        return None

    @abstractmethod
    def _call(self, jobs: list[GenerateJob], exclude: str | None) -> AsyncIterator[StreamItem]:
        """Send the jobs to one replica; yield its stream items."""

    @abstractmethod
    async def abort(self, replica_id: str, request_id: str) -> None:
        """Abort one job on the replica running it."""
