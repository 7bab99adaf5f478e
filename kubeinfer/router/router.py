"""The router: validates and tokenizes requests, admits them, batches them, sends them to a
model's replicas and streams the chunks back, retrying once elsewhere if a replica fails first.

Transport-neutral: the gRPC servicer and the HTTP app both call :meth:`Router.prepare` then
:meth:`Router.stream`. No Ray imports; the Ray Serve glue hands in its own pools.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

from kubeinfer.router.admission import AdmissionController, Rejected
from kubeinfer.router.batching import MicroBatcher
from kubeinfer.router.metrics import RouterMetrics
from kubeinfer.router.pool import JobStream, WorkerPool
from kubeinfer.router.types import Chunk, Code, GenerateJob, ReplicaFailed, RouterError
from kubeinfer.serve.config import RouterSettings
from kubeinfer.worker.sampling import SamplingParams
from kubeinfer.worker.tokenizer import Tokenizer


@dataclass
class ServedModel:
    """One model as the router knows it: its tokenizer, context length and replicas."""

    name: str
    tokenizer: Tokenizer
    max_model_len: int
    vocab_size: int
    pool: WorkerPool
    uri: str = ""
    quantization: str | None = None


class Router:
    """Owns the admission controller, one micro-batcher per model (when batching is on) and the
    metrics; the models' pools are handed in and shared with nobody else.

    Invariants: a request either gets a RouterError before its first chunk, or a stream of chunks
    ending in exactly one finished chunk (or an error raised mid-stream); its admission slot is
    released however it ends; a stream closed early aborts its job on the replica.
    """

    def __init__(self, models: list[ServedModel], settings: RouterSettings | None = None) -> None:
        if not models:
            raise ValueError("a router needs at least one model")
        self.settings = settings or RouterSettings()
        self.models = {m.name: m for m in models}
        self.default_model = models[0].name
        self.admission = AdmissionController(self.settings.max_queued, self.settings.max_in_flight)
        self.metrics = RouterMetrics(lambda: {n: m.pool.fresh_reports() for n, m in self.models.items()})
        self._batchers: dict[str, MicroBatcher] = {}
        self.draining = False

    # ---- request preparation (no I/O) ----------------------------------------------------------

    def model(self, name: str | None) -> ServedModel:
        served = self.models.get(name or self.default_model)
        if served is None:
            raise RouterError(Code.NOT_FOUND, f"model {name!r} is not served here; "
                                              f"served models: {', '.join(self.models)}")
        return served

    def prepare(self, *, model: str | None = None, prompt: str | None = None,
                prompt_token_ids: list[int] | None = None, messages: list[dict[str, str]] | None = None,
                sampling: dict[str, Any] | None = None, request_id: str | None = None,
                priority: int = 0) -> GenerateJob:
        """Validate and tokenize a request; RouterError (INVALID_ARGUMENT / NOT_FOUND) if it cannot run."""
        served = self.model(model)
        given = [x is not None for x in (prompt, prompt_token_ids, messages)]
        if sum(given) != 1:
            raise RouterError(Code.INVALID_ARGUMENT, "give exactly one of prompt, prompt_token_ids or messages")
        sampling = dict(sampling or {})
        try:
            SamplingParams(**sampling, priority=priority)
        except (ValueError, TypeError) as e:
            raise RouterError(Code.INVALID_ARGUMENT, str(e)) from None
        if messages is not None:
            prompt = self._render_chat(served, messages)
        if prompt is not None:
            if not isinstance(prompt, str):
                raise RouterError(Code.INVALID_ARGUMENT, "prompt must be a string")
            ids = served.tokenizer.encode(prompt)
        else:
            ids = list(prompt_token_ids)
            if any(not isinstance(t, int) or not 0 <= t < served.vocab_size for t in ids):
                raise RouterError(Code.INVALID_ARGUMENT,
                                  f"prompt token ids must be integers in [0, {served.vocab_size})")
        if not ids:
            raise RouterError(Code.INVALID_ARGUMENT, "the prompt is empty")
        if len(ids) >= served.max_model_len:
            raise RouterError(Code.INVALID_ARGUMENT,
                              f"the prompt has {len(ids)} tokens; model {served.name!r} has a context of "
                              f"{served.max_model_len} tokens, which must also leave room for the output")
        return GenerateJob(request_id or uuid.uuid4().hex, served.name, ids, sampling, priority)

    @staticmethod
    def _render_chat(served: ServedModel, messages: list[dict[str, str]]) -> str:
        if not messages or any(not isinstance(m, dict) or not isinstance(m.get("content"), str)
                               or m.get("role") not in ("system", "user", "assistant") for m in messages):
            raise RouterError(Code.INVALID_ARGUMENT,
                              "messages must be a non-empty list of {role: system|user|assistant, content: str}")
        try:
            return served.tokenizer.apply_chat_template(messages)
        except Exception as e:
            raise RouterError(Code.INVALID_ARGUMENT, f"cannot apply the chat template: {e}") from None

    # ---- the request path ------------------------------------------------------------------------

    async def stream(self, job: GenerateJob, *, timeout_s: float | None = None) -> AsyncIterator[Chunk]:
        """Run a prepared job and stream its chunks; RouterError for overload, deadline, failure.

        The deadline (the client's, capped by ``request_timeout_s``) bounds each wait of the
        router itself: for admission and for every next chunk, never the caller's own writes.
        """
        if self.draining:
            raise RouterError(Code.UNAVAILABLE, "the server is shutting down", retry_after_s=1.0)
        admission = self.admission.try_admit()
        if isinstance(admission, Rejected):
            self.metrics.requests.labels(job.model, "rejected").inc()
            raise RouterError(Code.RESOURCE_EXHAUSTED, admission.reason, retry_after_s=admission.retry_after_s)
        timeout_s = min(timeout_s or self.settings.request_timeout_s, self.settings.request_timeout_s)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        outcome = "cancelled"
        chunks = self._run(job, time.monotonic())
        try:
            self._update_gauges()
            async with asyncio.timeout_at(deadline):
                await admission.wait()
            self._update_gauges()
            while True:
                async with asyncio.timeout_at(deadline):
                    chunk = await anext(chunks, None)
                if chunk is None:
                    break
                if chunk.finished:
                    outcome = chunk.finish_reason
                yield chunk
        except TimeoutError:
            outcome = "deadline"
            raise RouterError(Code.DEADLINE_EXCEEDED, f"no answer within the deadline of {timeout_s:g} s") from None
        except RouterError as e:
            outcome = e.code.name.lower()
            raise
        finally:
            await chunks.aclose()
            admission.release()
            self._update_gauges()
            self.metrics.requests.labels(job.model, outcome).inc()

    async def _run(self, job: GenerateJob, start: float) -> AsyncIterator[Chunk]:
        served = self.models[job.model]
        m = self.metrics
        stream = await self._open(served, job)
        last = None
        try:
            for attempt in (0, 1):
                try:
                    async for chunk in stream:
                        if chunk.finish_reason == "rejected":  # the engine refused it: bad input
                            raise RouterError(Code.INVALID_ARGUMENT, chunk.error or "rejected by the engine")
                        if chunk.finish_reason == "error":
                            raise RouterError(Code.INTERNAL, f"the engine failed: {chunk.error}")
                        now = time.monotonic()
                        if chunk.token_ids:
                            if last is None:
                                m.ttft.labels(job.model).observe(now - start)
                            else:
                                m.itl.labels(job.model).observe((now - last) / len(chunk.token_ids))
                            last = now
                        if chunk.finished:
                            m.e2e.labels(job.model).observe(now - start)
                            m.prompt_tokens.labels(job.model).inc(chunk.prompt_tokens)
                            m.generation_tokens.labels(job.model).inc(chunk.completion_tokens)
                        yield chunk
                    return
                except ReplicaFailed as e:
                    await stream.aclose()
                    if stream.started or attempt == 1:
                        raise RouterError(Code.UNAVAILABLE, str(e)) from None
                    m.retries.labels(job.model).inc()
                    stream = served.pool.open([job], exclude=e.replica_id)[0]
        finally:
            await stream.aclose()

    async def _open(self, served: ServedModel, job: GenerateJob) -> JobStream:
        if self.settings.batch_window_ms <= 0:
            streams = served.pool.open([job])
            self.metrics.batch_size.labels(served.name).observe(1)
            return streams[0]
        batcher = self._batchers.get(served.name)
        if batcher is None:
            async def flush(jobs: list[GenerateJob], pool: WorkerPool = served.pool) -> list[JobStream]:
                self.metrics.batch_size.labels(served.name).observe(len(jobs))
                return pool.open(jobs)
            batcher = self._batchers[served.name] = MicroBatcher(
                flush, max_batch_size=self.settings.max_batch_size, window_ms=self.settings.batch_window_ms)
        return await batcher.submit(job)

    def _update_gauges(self) -> None:
        self.metrics.in_flight.set(self.admission.in_flight)
        self.metrics.queued.set(self.admission.queued)

    # ---- lifecycle -------------------------------------------------------------------------------

    async def drain(self, timeout_s: float = 30.0) -> None:
        """Stop admitting; wait (up to ``timeout_s``) for the requests in flight to finish."""
        self.draining = True
        deadline = time.monotonic() + timeout_s
        while (self.admission.in_flight or self.admission.queued) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def aclose(self) -> None:
        for batcher in self._batchers.values():
            await batcher.aclose()
