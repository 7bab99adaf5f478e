"""The engine load gauges tell the truth (issue 18): after a burst whose clients all disconnect,
``vllm:num_requests_running``, ``vllm:num_requests_waiting`` and ``vllm:kv_cache_usage_perc`` read 0
at the first scrape, with no further traffic. They used to keep the figures of the last report a
call happened to carry (an idle server showed 63 running for minutes).

Two pools: the in-process LocalPool (read at scrape time) and a pool that, like the Ray Serve one,
only knows the reports its replicas send (refreshed when its last call to a replica ends).
"""

from __future__ import annotations

import asyncio
import itertools
import random
from typing import AsyncIterator

from prometheus_client.parser import text_string_to_metric_families

from kubeinfer.local.router import build_local_router, shutdown_local_router
from kubeinfer.router.pool import WorkerPool
from kubeinfer.router.types import StreamItem
from kubeinfer.router.router import Router
from kubeinfer.router.served_model import ServedModel
from kubeinfer.router.types import GenerateJob
from kubeinfer.serve.config import AppConfig, ModelSpec, RouterSettings

LONG = dict(temperature=0.0, max_tokens=900, ignore_eos=True)
GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")


def scrape(router: Router) -> dict[str, float]:
    values = {}
    for family in text_string_to_metric_families(router.metrics.render().decode()):
        for sample in family.samples:
            if sample.name in GAUGES and sample.labels.get("model_name") == "tiny":
                values[sample.name] = sample.value
    return values


class ReportOnlyPool(WorkerPool):
    """Reaches the replicas only through calls, as ServePool does through Serve handles: its
    gauges can only come from the reports the replicas send."""

    def __init__(self, replicas) -> None:
        super().__init__()
        self.replicas = {r.replica_id: r for r in replicas}
        self._next = itertools.cycle(list(self.replicas.values()))

    async def _call(self, jobs: list[GenerateJob], exclude: str | None) -> AsyncIterator[StreamItem]:
        async for item in next(self._next).generate_batch(jobs):
            yield item

    async def abort(self, replica_id: str, request_id: str) -> None:
        self.replicas[replica_id].abort(request_id)

    async def refresh_report(self, replica_id: str):
        return await self.replicas[replica_id].settled_report()

    def shutdown(self) -> None:
        for r in self.replicas.values():
            r.engine.shutdown()


def build(tiny_llama_dir: str, report_only: bool) -> Router:
    spec = ModelSpec(name="tiny", uri=tiny_llama_dir, max_model_len=1024,
                     engine={"num_kv_blocks": 256, "max_num_seqs": 8}, num_replicas=2)
    router = build_local_router(AppConfig(models=[spec], router=RouterSettings(max_in_flight=64)))
    if report_only:
        local = router.models["tiny"].pool
        served: ServedModel = router.models["tiny"]
        served.pool = ReportOnlyPool(list(local.replicas.values()))
    return router


async def burst_then_disconnect(router: Router, n: int) -> dict[str, float]:
    """Open ``n`` long streams in two waves (the second's calls start while the first's requests
    run, so their first reports are busy), scrape once every stream has a token, drop every client."""
    rng = random.Random(n)
    streaming: set[int] = set()

    async def client(i: int):
        job = router.prepare(prompt_token_ids=[rng.randrange(3, 300) for _ in range(8)], sampling=LONG)
        async for _ in router.stream(job):
            streaming.add(i)
            await asyncio.sleep(0)

    async def until(count: int, tasks) -> None:
        for _ in range(4000):  # bounded; each engine step gives every running request a token
            if len(streaming) >= count or all(t.done() for t in tasks):
                return
            await asyncio.sleep(0.005)

    tasks = [asyncio.create_task(client(i)) for i in range(n // 2)]
    await until(n // 2, tasks)
    tasks += [asyncio.create_task(client(i)) for i in range(n // 2, n)]
    await until(n, tasks)
    busy = scrape(router)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return busy


async def quiesce(router: Router) -> None:
    """Wait (bounded) for the router's own clean-up (aborts, the final report request) to end: idle
    no admitted request, no open call to a replica and no clean-up task, at several checks in a row,
    before and after the engines' barriers. (Admission alone was not enough on a loaded CI machine:
    a call ends, and spawns the final report request, after its streams release their admission.)"""
    pool = router.models["tiny"].pool

    async def settled() -> None:
        calm = 0
        for _ in range(2000):
            calm = calm + 1 if not (router.admission.in_flight or pool.open_calls or pool._background) else 0
            if calm >= 5:
                return
            await asyncio.sleep(0.005)

    await settled()
    for replica in pool.replicas.values():
        await replica.engine.barrier()
    await settled()


def run_case(tiny_llama_dir: str, report_only: bool) -> tuple[dict, dict]:
    router = build(tiny_llama_dir, report_only)

    async def main():
        busy = await burst_then_disconnect(router, 12)
        await quiesce(router)
        return busy, scrape(router)

    try:
        return asyncio.run(main())
    finally:
        shutdown_local_router(router)  # either pool shuts the engines down


def test_in_process_gauges_read_zero_at_the_first_scrape_after_disconnect(tiny_llama_dir):
    busy, idle = run_case(tiny_llama_dir, report_only=False)
    assert busy["vllm:num_requests_running"] > 0 and busy["vllm:kv_cache_usage_perc"] > 0
    assert idle == {name: 0.0 for name in GAUGES}


def test_reported_gauges_read_zero_after_disconnect(tiny_llama_dir):
    busy, idle = run_case(tiny_llama_dir, report_only=True)
    assert busy["vllm:num_requests_running"] > 0
    assert idle == {name: 0.0 for name in GAUGES}
