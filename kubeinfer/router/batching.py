"""Micro-batching of concurrent requests (asyncio)."""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, Generic, NamedTuple, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class _Pending(NamedTuple):
    item: object
    future: asyncio.Future
    arrived: float  # loop time


class MicroBatcher(Generic[T, R]):
    """Groups items submitted concurrently into batches for one async ``flush(items) -> results``.

    A batch closes when it has ``max_batch_size`` items or ``window_ms`` after its first item
    arrived, whichever comes first; ``window_ms=0`` flushes whatever is queued at the next loop turn.
    ``flush`` is called once per batch and must return one result per item, in order. Batches are
    flushed concurrently (a slow flush does not hold back the next batch's window).

    Owns the pending items, one collector task (alive only while items are pending) and the running
    flush tasks. Invariants: every submitted item ends up in exactly one flush, unless its caller was
    cancelled before the batch closed (then it is dropped); every caller of a batch gets its own
    result or that flush's exception; a cancelled caller never affects the others. Single event loop,
    not thread-safe.
    """

    def __init__(self, flush: Callable[[list[T]], Awaitable[list[R]]], *, max_batch_size: int = 32,
                 window_ms: float = 2.0, discard: Callable[[R], object] | None = None) -> None:
        if max_batch_size < 1 or window_ms < 0:
            raise ValueError("need max_batch_size >= 1 and window_ms >= 0")
        self._flush = flush
        self._discard = discard or _close_result
        self.max_batch_size = max_batch_size
        self.window_s = window_ms / 1000.0
        self._pending: list[_Pending] = []
        self._full = asyncio.Event()  # wakes the collector early when a batch fills up
        self._collector: asyncio.Task | None = None
        self._flushes: set[asyncio.Task] = set()  # strong references, or the loop may drop them
        self._releases: set[asyncio.Task] = set()

    async def submit(self, item: T) -> R:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._pending.append(_Pending(item, future, loop.time()))
        if len(self._pending) >= self.max_batch_size:
            self._full.set()
        if self._collector is None:
            self._collector = asyncio.create_task(self._collect())
        # Cancelling this caller cancels only its own future; the collector skips it.
        try:
            return await future
        except asyncio.CancelledError:
            # Cancelled after its batch was flushed: the result (e.g. a job's open stream) has
            # no owner now, so release it, or the job runs on with nobody reading it.
            if future.done() and not future.cancelled() and future.exception() is None:
                self._release(future.result())
            raise

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                self._pending = [p for p in self._pending if not p.future.done()]
                if not self._pending:
                    return
                deadline = self._pending[0].arrived + self.window_s
                while len(self._pending) < self.max_batch_size and (delay := deadline - loop.time()) > 0:
                    self._full.clear()
                    try:
                        await asyncio.wait_for(self._full.wait(), delay)
                    except TimeoutError:
                        break
                batch = [p for p in self._pending[:self.max_batch_size] if not p.future.done()]
                del self._pending[:self.max_batch_size]
                if batch:
                    task = asyncio.create_task(self._run_flush(batch))
                    self._flushes.add(task)
                    task.add_done_callback(self._flushes.discard)
        finally:
            # No await between the empty check and here, so no submit can slip in unseen.
            self._collector = None

    async def _run_flush(self, batch: list[_Pending]) -> None:
        try:
            results = await self._flush([p.item for p in batch])  # type: ignore[misc]
            if len(results) != len(batch):
                raise RuntimeError(f"flush returned {len(results)} results for {len(batch)} items")
        except asyncio.CancelledError:
            for p in batch:
                p.future.cancel()
            raise
        except Exception as exc:
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        for p, result in zip(batch, results):
            if not p.future.done():
                p.future.set_result(result)
            else:  # its caller was cancelled meanwhile: nobody will use or close this result
                self._release(result)

    def _release(self, result: R) -> None:
        outcome = self._discard(result)
        if asyncio.iscoroutine(outcome):
            task = asyncio.ensure_future(outcome)  # not in _flushes: aclose() must not cut it short
            self._releases.add(task)
            task.add_done_callback(self._releases.discard)

    async def aclose(self) -> None:
        """Cancel the collector and any running flush; their callers see CancelledError."""
        tasks = [t for t in (self._collector, *self._flushes) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for p in self._pending:
            p.future.cancel()
        self._pending.clear()


def _close_result(result: object):
    """Default ``discard``: close a result that can be closed (an async stream's ``aclose()``)."""
    aclose = getattr(result, "aclose", None)
    return aclose() if callable(aclose) else None
