"""The HTTP surfaces' streaming plumbing: a request's chunks pumped in a task of their own
(DetachedStream), work abandoned when its client leaves before the response starts
(unless_client_gone), and server-sent events closed with the response however it ends (EventStream).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from kubeinfer.router.types import Chunk, Code, RouterError

T = TypeVar("T")
_END = object()


class DetachedStream:
    """Runs one request's ``stream_choices`` in a task of its own and hands its ``(index, chunk)``
    items to one reader.

    Once its client has gone, Starlette (anyio) cancels a streaming response's task again at every
    await; iterated there, the router's cleanup is cancelled at its own first await (the batch
    call's teardown, or a pool's abort that awaits a remote call). Here the reader may be cancelled
    freely and ``close()`` cancels the router's stream exactly once. Invariant: the reader gets
    chunks in order, then None (again on every later call) or the stream's error.
    """

    def __init__(self, chunks: AsyncIterator[tuple[int, Chunk]], tasks: set[asyncio.Task]) -> None:
        self._queue: asyncio.Queue = asyncio.Queue()
        self._task = asyncio.create_task(self._pump(chunks))
        tasks.add(self._task)  # the loop keeps only weak references to tasks
        self._task.add_done_callback(tasks.discard)

    async def _pump(self, chunks: AsyncIterator[tuple[int, Chunk]]) -> None:
        try:
            async for chunk in chunks:
                self._queue.put_nowait(chunk)
        except Exception as e:
            self._queue.put_nowait(e)
        else:
            self._queue.put_nowait(_END)

    async def next(self) -> tuple[int, Chunk] | None:
        item = await self._queue.get()
        if item is _END:
            self._queue.put_nowait(_END)
            return None
        if isinstance(item, BaseException):
            raise item
        return item

    async def collect(self) -> list[tuple[int, Chunk]]:
        chunks = []
        while (chunk := await self.next()) is not None:
            chunks.append(chunk)
        return chunks

    def close(self) -> None:
        self._task.cancel()


class ClientGone(Exception):
    """The client disconnected before its response started."""


async def unless_client_gone(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; if the client disconnects first, cancel it and raise ClientGone.

    Only before a response starts: once streaming, Starlette watches for the disconnect itself.
    """
    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work_task, gone = asyncio.ensure_future(work), asyncio.create_task(disconnected())
    try:
        await asyncio.wait({work_task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if work_task.done():
            return work_task.result()
        raise ClientGone
    finally:
        work_task.cancel()
        gone.cancel()


class EventStream(StreamingResponse):
    """Server-sent events whose generator is closed as soon as the response ends, however it ends
    (a client disconnect included), so the request it streams is aborted at once rather than when
    the generator happens to be garbage-collected."""

    media_type = "text/event-stream"

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def respond(request: Request, stream: DetachedStream, streaming: bool,
                  whole: Callable[[list[tuple[int, Chunk]]], dict[str, Any]],
                  events: Callable[[tuple[int, Chunk]], AsyncIterator[str]]) -> Response:
    """The response to a request whose chunks ``stream`` pumps: ``whole(chunks)`` as JSON, or when
    streaming the events ``events(first)`` writes from the first chunk on. The first chunk is awaited
    here, so that overload and bad input still get their status code; the stream is closed on any
    way out before the response is handed back."""
    try:
        if not streaming:
            return JSONResponse(whole(await unless_client_gone(request, stream.collect())))
        first = await unless_client_gone(request, stream.next())
    except BaseException:
        stream.close()
        raise
    if first is None:
        raise RouterError(Code.INTERNAL, "the stream ended without a chunk")
    return EventStream(events(first))
