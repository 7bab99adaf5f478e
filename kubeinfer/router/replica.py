"""A worker replica: one engine behind the call the router makes (in process or as a Ray Serve
deployment's method)."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Union

from kubeinfer.router.types import Chunk, GenerateJob, ReplicaReport
from kubeinfer.worker.async_engine import AsyncEngine
from kubeinfer.worker.outputs import RequestOutput
from kubeinfer.worker.sampling import SamplingParams

# A replica's stream: ``(index, Chunk)`` for the index-th job of the call, and ``(-1, report)``
# first (so the caller learns which replica it reached) and last (its load after the call).
StreamItem = tuple[int, Union[Chunk, ReplicaReport]]


class EngineReplica:
    """Owns one AsyncEngine and runs batches of jobs on it, merging their outputs into one stream.

    Invariants: every job of a call ends with exactly one finished Chunk in that call's stream
    (a job the engine refuses ends at once with ``finish_reason="rejected"``); closing the stream
    early aborts every job of the call that is still live, freeing its KV blocks.
    """

    def __init__(self, engine: AsyncEngine, replica_id: str) -> None:
        self.engine = engine
        self.replica_id = replica_id

    def report(self) -> ReplicaReport:
        s = self.engine.stats()
        return ReplicaReport(self.replica_id, s.num_requests_running, s.num_requests_waiting,
                             s.kv_cache_usage, s.num_preemptions, s.prefix_cache_queries, s.prefix_cache_hits)

    async def generate_batch(self, jobs: list[GenerateJob]) -> AsyncIterator[StreamItem]:
        yield -1, self.report()
        merged: asyncio.Queue[StreamItem] = asyncio.Queue()
        tasks = [asyncio.create_task(self._run(i, job, merged)) for i, job in enumerate(jobs)]
        try:
            for _ in range(len(jobs)):
                while True:
                    item = await merged.get()
                    yield item
                    if item[1].finished:
                        break
        finally:
            for t in tasks:  # a cancelled task closes its engine stream, which aborts the request
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        yield -1, self.report()

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    async def _run(self, index: int, job: GenerateJob, out: asyncio.Queue[StreamItem]) -> None:
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
                 o.num_prompt_tokens, o.num_output_tokens, o.num_cached_tokens, o.logprobs)
