"""An asyncio front for the Engine: the step loop runs in its own thread, outputs stream to callers."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import uuid
from collections import deque
from typing import AsyncIterator, Callable

from kubeinfer.worker.engine import Engine
from kubeinfer.worker.outputs import RequestOutput
from kubeinfer.worker.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class AsyncEngine:
    """Owns one Engine and the thread that steps it.

    The Engine is only ever touched from that thread: adds and aborts are queued to it and applied
    between steps, so callers on the event loop never block on a forward pass. Each live request has
    one asyncio queue; the thread hands a step's outputs to the loop in one call. Invariant: every
    request that was accepted ends with exactly one finished output (completed, stopped, aborted or
    errored), so no caller waits for ever.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._inbox: deque[Callable[[], None]] = deque()
        self._wake = threading.Event()
        self._stopped = False
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread = threading.Thread(target=self._run, name="kubeinfer-engine", daemon=True)
        self._thread.start()

    # ---- caller side (event loop) -------------------------------------------------------------

    async def generate(self, prompt: str | None = None, params: SamplingParams | None = None, *,
                       prompt_token_ids: list[int] | None = None, request_id: str | None = None
                       ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; ValueError for bad input. Closing the stream aborts it."""
        if self._stopped:
            raise RuntimeError("the engine is shut down")
        request_id = request_id or uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        accepted: concurrent.futures.Future = concurrent.futures.Future()

        def add() -> None:
            # A caller cancelled before this runs has gone: never add its request (nobody would read
            # or abort it). After this check the future can no longer be cancelled, so the request's
            # fate is the caller's finally below, which queues its abort behind this add.
            if not accepted.set_running_or_notify_cancel():
                return
            try:
                self.engine.add_request(request_id, prompt, params, prompt_token_ids=prompt_token_ids)
            except Exception as e:  # handed back to the caller, never kills the loop
                accepted.set_exception(e)
                return
            self._queues[request_id] = (loop, queue)
            accepted.set_result(None)

        finished = False
        try:
            self._submit(add)
            # The abort must cover this wait too: a caller cancelled here (before or after add ran)
            # would otherwise leave its request running in the engine to the end of its context.
            await asyncio.wrap_future(accepted)
            while not finished:
                out: RequestOutput = await queue.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                self._abort_own(request_id, queue)

    def _abort_own(self, request_id: str, queue: asyncio.Queue) -> None:
        """Abort ``request_id`` only if it is still this caller's request (its id may be reused by
        another caller once it finished, or a refused duplicate id names someone else's request)."""
        def do_abort() -> None:
            entry = self._queues.get(request_id)
            if entry is None or entry[1] is not queue:
                return
            del self._queues[request_id]
            self.engine.abort(request_id)
        self._submit(do_abort)

    async def barrier(self) -> None:
        """Return once every call queued to the engine thread before it (adds, aborts) is applied,
        so a report read afterwards sees their effect."""
        done: concurrent.futures.Future = concurrent.futures.Future()
        def mark() -> None:
            if done.set_running_or_notify_cancel():
                done.set_result(None)
        self._submit(mark)
        if self.alive():  # bounded: a thread that stops meanwhile never applies it
            try:
                await asyncio.wait_for(asyncio.wrap_future(done), 5.0)
            except TimeoutError:
                pass

    def abort(self, request_id: str) -> None:
        def do_abort() -> None:
            entry = self._queues.pop(request_id, None)
            if self.engine.abort(request_id) and entry is not None:
                loop, queue = entry
                out = RequestOutput(request_id, [], "", "", [], finished=True, finish_reason="abort")
                loop.call_soon_threadsafe(queue.put_nowait, out)
        self._submit(do_abort)

    def stats(self):
        return self.engine.stats()

    def alive(self) -> bool:
        """Whether the step thread is running (it only stops on shutdown or a bug)."""
        return self._thread.is_alive() and not self._stopped

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the step loop; requests still live are aborted (their callers get a finished output)."""
        def abort_all() -> None:
            for request_id in list(self._queues):
                self.abort(request_id)
        self._submit(abort_all)
        self._submit(self._stop)
        self._thread.join(timeout)

    # ---- engine thread --------------------------------------------------------------------------

    def _submit(self, fn: Callable[[], None]) -> None:
        self._inbox.append(fn)
        self._wake.set()

    def _stop(self) -> None:
        self._stopped = True

    def _run(self) -> None:
        while not self._stopped:
            while self._inbox:
                self._apply(self._inbox.popleft())
            if self._stopped:
                break
            if not self.engine.has_unfinished_requests():
                self._wake.wait()
                self._wake.clear()
                continue
            self._deliver(self.engine.step())
        while self._inbox:  # run the aborts queued with the stop
            self._apply(self._inbox.popleft())

    @staticmethod
    def _apply(fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:  # one caller's failure (e.g. its event loop closed) must not stop the engine
            log.exception("engine thread: queued call failed")

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        for out in outputs:
            entry = self._queues.pop(out.request_id) if out.finished else self._queues.get(out.request_id)
            if entry is not None:
                by_loop.setdefault(entry[0], []).append((entry[1], out))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that caller's event loop has closed: nobody is listening
                for _, out in items:
                    self._queues.pop(out.request_id, None)
                    self.engine.abort(out.request_id)


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for queue, out in items:
        queue.put_nowait(out)
