"""An engine as a router replica: the worker side of the router's replica contract
(``kubeinfer.router.types``), run in the process that holds the engine (the local stack, or a Ray
Serve worker deployment)."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from kubeinfer.router.types import Chunk, GenerateJob, ReplicaReport, StreamItem
from kubeinfer.worker.async_engine import AsyncEngine
from kubeinfer.worker.outputs import RequestOutput
from kubeinfer.worker.sampling_params import SamplingParams


class EngineReplica:
    """Owns one AsyncEngine and runs batches of jobs on it, merging their outputs into one stream.

    Invariants: every job of a call ends with exactly one finished Chunk in that call's stream
    (a job the engine refuses ends at once with ``finish_reason="rejected"``); closing the stream
    early aborts every job of the call that is still live, freeing its KV blocks.
    """

    # While a call streams, its report is refreshed at most this often, so the router's load gauges
    # follow the engine during long streams and not only at a call's start and end.
    REPORT_INTERVAL_S = 0.5

    def __init__(self, engine: AsyncEngine, replica_id: str) -> None:
        self.engine = engine
        self.replica_id = replica_id
        # request_id -> aborted? for the jobs of the calls in progress: an abort can arrive before
        # the job's request reaches the engine, and must then stop it from ever being added.
        self._jobs: dict[str, bool] = {}

    def report(self) -> ReplicaReport:
        s = self.engine.stats()
        return ReplicaReport(self.replica_id, s.num_requests_running, s.num_requests_waiting,
                             s.kv_cache_usage, s.num_preemptions, s.prefix_cache_queries, s.prefix_cache_hits,
                             tuple(s.iteration_tokens.counts), s.iteration_tokens.total,
                             s.speculative.counts() if s.speculative.num_drafts else ())

    async def settled_report(self) -> ReplicaReport:
        """The report once every add and abort queued so far has reached the engine (an idle
        replica then reads zero)."""
        await self.engine.barrier()
        return self.report()

    async def generate_batch(self, jobs: list[GenerateJob]) -> AsyncIterator[StreamItem]:
        yield -1, self.report()
        loop = asyncio.get_running_loop()
        merged: asyncio.Queue[StreamItem] = asyncio.Queue()
        for job in jobs:
            self._jobs.setdefault(job.request_id, False)
        tasks = [asyncio.create_task(self._run(i, job, merged)) for i, job in enumerate(jobs)]
        last_report = -self.REPORT_INTERVAL_S  # the first chunk brings a report with this call's jobs in
        try:
            for _ in range(len(jobs)):
                while True:
                    item = await merged.get()
                    yield item
                    if item[1].finished:
                        break
                    if loop.time() - last_report >= self.REPORT_INTERVAL_S:
                        last_report = loop.time()
                        yield -1, self.report()
        finally:
            for t in tasks:  # a cancelled task closes its engine stream, which aborts the request
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for job in jobs:
                self._jobs.pop(job.request_id, None)
        yield -1, await self.settled_report()

    def abort(self, request_id: str) -> None:
        if request_id in self._jobs:
            self._jobs[request_id] = True  # if its request is not in the engine yet, it never will be
        self.engine.abort(request_id)

    async def _run(self, index: int, job: GenerateJob, out: asyncio.Queue[StreamItem]) -> None:
        if self._jobs.get(job.request_id):  # aborted before it started; no await between here and
            out.put_nowait((index, Chunk(job.request_id, finish_reason="abort")))  # the engine's add
            return
        try:
            params = SamplingParams(**job.sampling, priority=job.priority)
            stream = self.engine.generate(params=params, prompt_token_ids=job.prompt_token_ids,
                                          request_id=job.request_id)
            async for o in stream:
                out.put_nowait((index, _chunk(o)))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a refused request ends its own stream; the others go on
            out.put_nowait((index, Chunk(job.request_id, finish_reason="rejected", error=str(e))))


def _chunk(o: RequestOutput) -> Chunk:
    return Chunk(o.request_id, o.delta_text, o.new_token_ids, o.finish_reason, o.error,
                 o.num_prompt_tokens, o.num_output_tokens, o.num_cached_tokens, o.logprobs, o.timings,
                 prompt_logprobs=o.prompt_logprobs)
