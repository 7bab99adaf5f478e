"""The router: validates and tokenizes requests, admits them, batches them, sends them to a
model's replicas and streams the chunks back, retrying elsewhere (a bounded number of times) a job
whose replica failed before it streamed anything.

Transport-neutral: the gRPC servicer and the HTTP app both call :meth:`Router.prepare` then
:meth:`Router.stream`. No Ray imports; the Ray Serve glue hands in its own pools.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, AsyncIterator

from kubeinfer.router.admission import Admission, AdmissionController, Rejected
from kubeinfer.router.batching import MicroBatcher
from kubeinfer.router.client_input import check_grammar, check_text, readable
from kubeinfer.router.metrics import RouterMetrics
from kubeinfer.router.pool import JobStream, WorkerPool
from kubeinfer.router.types import Chunk, Code, GenerateJob, ReplicaFailed, RouterError
from kubeinfer.router.served_model import ServedModel, live_replicas, replica_capacity
from kubeinfer.router.settings import RouterSettings
from kubeinfer.worker.sampling_params import SamplingParams
from kubeinfer.worker.tokenizer import ChatTemplate


QUEUE_FACTOR = 2  # the default queue holds this many times the replicas' capacity
# The default in-flight bound's floor: a small fleet (a laptop's one replica) keeps a waiting queue in
# its engine, whose next step admits from it, rather than in the router, whose max_queue_wait_s
# would refuse a request that the engine serves a little later.
MIN_IN_FLIGHT = 256
SEED_RANGE = (-(1 << 63), 1 << 63)
CHAT_ROLES = ("system", "user", "assistant", "tool")  # tool: a tool's result, for the template to render
# A job whose replica fails before its first chunk is sent again, after these pauses (so at most
# len + 1 tries). More than one retry: a call can die before its replica is known (no report yet),
# and then the retry cannot exclude it; Serve keeps routing to a killed replica until it learns of
# the death (an ActorUnavailableError only invalidates its cache), which the pauses give it time to.
RETRY_PAUSES_S: tuple[float, ...] = (0.0, 0.25, 1.0)
# The retry hint of a request that found no replica within max_capacity_wait_s: a replica may still
# be starting (a scale from zero), so a retry a few seconds on is likely to find it.
CAPACITY_RETRY_AFTER_S = 5.0


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
        capacity = sum(replica_capacity(m) for m in models)
        max_queued = self.settings.max_queued
        if max_queued is None:
            max_queued = QUEUE_FACTOR * capacity
        max_in_flight = self.settings.max_in_flight
        if max_in_flight is None:
            max_in_flight = max(MIN_IN_FLIGHT, capacity)
        self.admission = AdmissionController(max_queued, max_in_flight)
        self.max_body_bytes = self.settings.body_byte_limit(max(m.max_model_len for m in models))
        self.metrics = RouterMetrics(lambda: {n: m.pool.fresh_reports() for n, m in self.models.items()})
        for name in self.models:  # shown at 0 from the start, not only once a request has waited
            self.metrics.waiting_for_capacity.labels(name)
            self.metrics.capacity_timeouts.labels(name)
        self._batchers: dict[str, MicroBatcher] = {}
        self.draining = False
        # Requests of each model waiting in the admission queue (an autoscaling signal: the Serve
        # ingress reports it to Serve's controller as its Worker deployment's queued requests).
        self.queued_by_model: dict[str, int] = {name: 0 for name in self.models}

    def unready_models(self) -> list[str]:
        """Models with no live replica, as far as their pools can tell (see served_model.live_replicas)."""
        return [name for name, served in self.models.items() if live_replicas(served.pool) == 0]

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
                priority: int = 0, fill_context: bool = False, chat_template: ChatTemplate | None = None) -> GenerateJob:
        """Validate and tokenize a request; RouterError (INVALID_ARGUMENT / NOT_FOUND) if it cannot run.

        Every bound that needs no tokenizer is checked first, so an oversized request costs nothing.
        An omitted ``max_tokens`` becomes the room left in the context with ``fill_context`` (chat,
        as vLLM does), else the default capped by that room; a given one beyond the room is refused.
        """
        served, sampling = self.check_input(model, prompt, prompt_token_ids, messages, sampling, request_id, priority)
        return self._tokenize(served, sampling, prompt=prompt, prompt_token_ids=prompt_token_ids, messages=messages,
                              request_id=request_id, priority=priority, fill_context=fill_context,
                              chat_template=chat_template)

    async def aprepare(self, *, model: str | None = None, prompt: str | None = None,
                       prompt_token_ids: list[int] | None = None, messages: list[dict[str, str]] | None = None,
                       sampling: dict[str, Any] | None = None, request_id: str | None = None,
                       priority: int = 0, fill_context: bool = False,
                       chat_template: ChatTemplate | None = None) -> GenerateJob:
        """:meth:`prepare` with the cheap checks on the event loop and the tokenizing (and a
        structured-output grammar's parsing) on a thread, so one large prompt or schema never stalls
        the other requests (nor /health)."""
        served, sampling = self.check_input(model, prompt, prompt_token_ids, messages, sampling, request_id, priority)
        return await asyncio.to_thread(self._tokenize, served, sampling, prompt=prompt,
                                       prompt_token_ids=prompt_token_ids, messages=messages, request_id=request_id,
                                       priority=priority, fill_context=fill_context, chat_template=chat_template)

    def _tokenize(self, served: ServedModel, sampling: dict[str, Any], *, prompt, prompt_token_ids, messages,
                  request_id, priority, fill_context, chat_template=None) -> GenerateJob:
        """The work after :meth:`check_input`: the grammar's parse, the chat template, tokenizing, and the
        checks that need the token count."""
        if sampling.get("structured_output") is not None:
            check_grammar(sampling["structured_output"])
        if messages is not None:
            prompt = self.render_chat(served, messages, chat_template)
        if prompt is not None:
            ids = served.tokenizer.encode(prompt)
        else:
            ids = list(prompt_token_ids)
        if not ids:
            raise RouterError(Code.INVALID_ARGUMENT, "the prompt is empty")
        room = served.max_model_len - len(ids)
        if room < 1:
            raise RouterError(Code.INVALID_ARGUMENT,
                              f"the prompt has {len(ids)} tokens; model {served.name!r} has a context of "
                              f"{served.max_model_len} tokens, which must also leave room for the output")
        if "max_tokens" not in sampling:
            sampling["max_tokens"] = room if fill_context else min(SamplingParams().max_tokens, room)
        elif sampling["max_tokens"] > room:
            raise RouterError(Code.INVALID_ARGUMENT,
                              f"max_tokens is {sampling['max_tokens']}, but the prompt has {len(ids)} tokens and "
                              f"model {served.name!r} has a context of {served.max_model_len} tokens: "
                              f"max_tokens may be at most {room}")
        return GenerateJob(request_id or uuid.uuid4().hex, served.name, ids, sampling, priority)

    def check_input(self, model, prompt, prompt_token_ids, messages, sampling=None, request_id=None,
                    priority=0) -> tuple[ServedModel, dict]:
        """The checks that need no tokenizer; the served model and a copy of ``sampling``."""
        if model is not None:
            if not isinstance(model, str):
                raise RouterError(Code.INVALID_ARGUMENT, "model must be a string")
            check_text(model, "model")
        served = self.model(model)
        given = [x is not None for x in (prompt, prompt_token_ids, messages)]
        if sum(given) != 1:
            raise RouterError(Code.INVALID_ARGUMENT, "give exactly one of prompt, prompt_token_ids or messages")
        if request_id is not None and (not isinstance(request_id, str) or len(request_id) > 256):
            raise RouterError(Code.INVALID_ARGUMENT, "request_id must be a string of at most 256 characters")
        if request_id is not None:
            check_text(request_id, "request_id")
        limit = self.settings.prompt_char_limit(served.max_model_len)
        if prompt is not None:
            if not isinstance(prompt, str):
                raise RouterError(Code.INVALID_ARGUMENT, "prompt must be a string")
            if len(prompt) > limit:
                raise RouterError(Code.INVALID_ARGUMENT, f"the prompt has {len(prompt)} characters; the limit "
                                                         f"(max_prompt_chars) is {limit}")
            check_text(prompt, "prompt")
        if messages is not None:
            if not isinstance(messages, list) or not messages or any(
                    not isinstance(m, dict) or not isinstance(m.get("content"), str)
                    or m.get("role") not in CHAT_ROLES for m in messages):
                raise RouterError(Code.INVALID_ARGUMENT,
                                  "messages must be a non-empty list of {role: system|user|assistant|tool, content: str}")
            total = sum(len(m["content"]) for m in messages)
            if total > limit:
                raise RouterError(Code.INVALID_ARGUMENT, f"the messages have {total} characters; the limit "
                                                         f"(max_prompt_chars) is {limit}")
            for m in messages:
                check_text(m["content"], "a message's content")
        if prompt_token_ids is not None:
            if not isinstance(prompt_token_ids, list):
                raise RouterError(Code.INVALID_ARGUMENT, "prompt_token_ids must be a list of integers")
            if len(prompt_token_ids) >= served.max_model_len:
                raise RouterError(Code.INVALID_ARGUMENT,
                                  f"the prompt has {len(prompt_token_ids)} tokens; model {served.name!r} has a "
                                  f"context of {served.max_model_len} tokens, which must also leave room for the output")
            if any(type(t) is not int or not 0 <= t < served.vocab_size for t in prompt_token_ids):
                raise RouterError(Code.INVALID_ARGUMENT,
                                  f"prompt token ids must be integers in [0, {served.vocab_size})")
        sampling = dict(sampling or {})
        seed = sampling.get("seed")
        if type(seed) is int and not SEED_RANGE[0] <= seed < SEED_RANGE[1]:
            raise RouterError(Code.INVALID_ARGUMENT, f"seed must be an integer in [-2**63, 2**63), got {seed}")
        for name, ids in (("stop_token_ids", sampling.get("stop_token_ids")),
                          ("logit_bias's token ids", sampling.get("logit_bias"))):
            if isinstance(ids, (list, dict)) and any(type(t) is int and not 0 <= t < served.vocab_size for t in ids):
                raise RouterError(Code.INVALID_ARGUMENT, f"{name} must be integers in [0, {served.vocab_size})")
        stop = sampling.get("stop")
        for s in [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []:
            if isinstance(s, str):
                check_text(s, "a stop string")
        try:
            SamplingParams(**sampling, priority=priority)
        except (ValueError, TypeError) as e:
            raise RouterError(Code.INVALID_ARGUMENT, readable(str(e))) from None
        return served, sampling

    @staticmethod
    def render_chat(served: ServedModel, messages: list[dict[str, Any]], options: ChatTemplate | None = None) -> str:
        try:
            return served.tokenizer.apply_chat_template(messages, options)
        except Exception as e:
            raise RouterError(Code.INVALID_ARGUMENT, f"cannot apply the chat template: {readable(str(e))}") from None

    # ---- the request path ------------------------------------------------------------------------

    def check_job_count(self, count: int) -> None:
        """INVALID_ARGUMENT for a request of more jobs than this router could ever hold at once."""
        room = self.admission.max_in_flight + self.admission.max_queued
        if count > room:
            raise RouterError(Code.INVALID_ARGUMENT, f"the request asks for {count} jobs (its prompts x n), but this "
                                                     f"router holds at most {room} at once (max_in_flight + max_queued)")

    def admit(self, model: str, count: int = 1) -> list[Admission]:
        """Places for ``count`` jobs of one request, all or none (RouterError otherwise): n choices
        are n jobs, each held to the in-flight and queue bounds like a request. More than the
        router could ever hold at once is INVALID_ARGUMENT (it would never be admitted), fewer
        free places than asked RESOURCE_EXHAUSTED; so is an expected queue wait past the bound."""
        if self.draining:
            raise RouterError(Code.UNAVAILABLE, "the server is shutting down", retry_after_s=1.0)
        self.check_job_count(count)
        admitted: list[Admission] = []
        for _ in range(count):
            admission = self.admission.try_admit()
            if isinstance(admission, Rejected):
                for a in admitted:
                    a.release()
                self._update_gauges()
                self.metrics.requests.labels(model, "rejected").inc()
                raise RouterError(Code.RESOURCE_EXHAUSTED, admission.reason, retry_after_s=admission.retry_after_s)
            admitted.append(admission)
        expected = self.admission.expected_wait_s() if admitted[-1].state == "queued" else None
        if expected is not None and expected > self.settings.max_queue_wait_s:
            for a in admitted:  # it would wait past the bound: say so now rather than after the wait
                a.release()
            self._update_gauges()
            self.metrics.requests.labels(model, "rejected").inc()
            raise RouterError(Code.RESOURCE_EXHAUSTED, f"overloaded: the expected wait of {expected:.1f} s exceeds "
                                                       f"max_queue_wait_s = {self.settings.max_queue_wait_s:g} s",
                              retry_after_s=self.admission.retry_after_s())
        return admitted

    def release(self, admissions: list[Admission]) -> None:
        """Give back places from :meth:`admit` (those already released are skipped)."""
        for a in admissions:
            a.release()
        self._update_gauges()

    async def stream(self, job: GenerateJob, *, timeout_s: float | None = None,
                     admission: Admission | None = None) -> AsyncIterator[Chunk]:
        """Run a prepared job and stream its chunks; RouterError for overload, deadline, failure.

        The deadline (the client's, capped by ``request_timeout_s``) bounds each wait of the
        router itself: for admission and for every next chunk, never the caller's own writes.
        ``admission``: a place from :meth:`admit` (then released here however the stream ends,
        once it has started); None admits the job here.
        """
        if admission is None:
            admission = self.admit(job.model)[0]
        timeout_s = min(timeout_s or self.settings.request_timeout_s, self.settings.request_timeout_s)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        outcome = "cancelled"
        chunks = self._run(job, time.monotonic())
        try:
            self._update_gauges()
            queue_deadline = min(deadline, loop.time() + self.settings.max_queue_wait_s)
            queued = admission.state == "queued"
            if queued:
                self.queued_by_model[job.model] += 1
            try:
                async with asyncio.timeout_at(queue_deadline):
                    await admission.wait()
            except TimeoutError:
                if queue_deadline >= deadline:
                    raise
                self.metrics.requests.labels(job.model, "rejected").inc()
                outcome = None
                raise RouterError(Code.RESOURCE_EXHAUSTED,
                                  f"overloaded: no slot within max_queue_wait_s = {self.settings.max_queue_wait_s:g} s",
                                  retry_after_s=self.admission.retry_after_s()) from None
            finally:
                if queued:
                    self.queued_by_model[job.model] -= 1
            self._update_gauges()
            while True:
                # timeout_at only fires when the wait suspends: chunks already queued (a client that
                # reads slower than the engine writes) would run past the deadline unchecked.
                if loop.time() >= deadline:
                    raise TimeoutError
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
            outcome = outcome and e.code.name.lower()
            raise
        finally:
            await chunks.aclose()
            admission.release()
            self._update_gauges()
            if outcome is not None:
                self.metrics.requests.labels(job.model, outcome).inc()
            if outcome == "cancelled":
                self.metrics.record_abandoned(job.model)

    async def _run(self, job: GenerateJob, start: float) -> AsyncIterator[Chunk]:
        served = self.models[job.model]
        m = self.metrics
        router_wait = time.monotonic() - start  # this body first runs once the request is admitted
        stream = await self._open(served, job)
        last = None
        pauses, excluded = iter(RETRY_PAUSES_S), None
        try:
            while True:
                try:
                    await self._wait_for_capacity(job.model, stream)
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
                            m.record_finished(job.model, chunk, e2e_s=now - start, router_wait_s=router_wait,
                                              max_tokens=job.sampling.get("max_tokens"))
                        yield chunk
                    return
                except ReplicaFailed as e:
                    await stream.aclose()
                    pause = None if stream.started else next(pauses, None)
                    if pause is None:  # tokens already reached the client, or the tries are spent
                        raise RouterError(Code.UNAVAILABLE, str(e)) from None
                    m.retries.labels(job.model).inc()
                    excluded = e.replica_id or excluded
                    if pause:
                        await asyncio.sleep(pause)
                    stream = served.pool.open([job], exclude=excluded)[0]
        finally:
            await stream.aclose()

    async def _wait_for_capacity(self, model: str, stream: JobStream) -> None:
        """Wait (up to ``max_capacity_wait_s``; the caller's deadline bounds it too) until the job's
        call reaches a replica: Serve holds a call while the deployment has no running replica (a
        scale from zero) and would hold it without bound. Counted in the waiting-for-capacity
        gauge meanwhile; past the bound UNAVAILABLE with a retry hint, and the caller's close of
        the stream cancels the call, so it never starts later with nobody reading it."""
        if stream.placed:
            return
        waiting = self.metrics.waiting_for_capacity.labels(model)
        waiting.inc()
        try:
            async with asyncio.timeout(self.settings.max_capacity_wait_s):
                await stream.wait_placed()
        except TimeoutError:
            self.metrics.capacity_timeouts.labels(model).inc()
            raise RouterError(Code.UNAVAILABLE,
                              f"no replica of model {model!r} took the request within max_capacity_wait_s = "
                              f"{self.settings.max_capacity_wait_s:g} s (it may be starting, e.g. from zero replicas)",
                              retry_after_s=CAPACITY_RETRY_AFTER_S) from None
        finally:
            waiting.dec()

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
