"""The Worker deployment: one engine per Ray Serve replica, streaming batch calls."""

from __future__ import annotations

import logging
import time
from typing import Any, AsyncIterator

from ray import serve

from kubeinfer.local.replica import EngineReplica
from kubeinfer.router.types import StreamItem
from kubeinfer.router.types import GenerateJob, ReplicaReport
from kubeinfer.serve.autoscaling import LatencyWindow, replica_stats
from kubeinfer.serve.config import ModelSpec

log = logging.getLogger(__name__)


@serve.deployment(max_ongoing_requests=256, health_check_period_s=10, graceful_shutdown_timeout_s=30)
class Worker:
    """Owns one Engine (stepped by an AsyncEngine thread, so the replica's event loop never blocks
    on a forward pass) and its EngineReplica adapter. Reports its load to Serve's request router
    through ``record_routing_stats`` and its LLM signals to Serve's autoscaler through
    ``record_autoscaling_stats`` (both read the one ReplicaReport); fails its health check if the
    engine thread has died."""

    def __init__(self, spec: dict[str, Any]) -> None:
        from kubeinfer.worker import Engine, EngineConfig
        from kubeinfer.worker.async_engine import AsyncEngine
        model = ModelSpec(**spec)
        # A device this replica cannot have (e.g. CUDA on a node without a GPU) raises ValueError here,
        # before the model loads; Serve reports it as the deployment's message (DEPLOY_FAILED after
        # its retries), which the operator turns into the ModelDeployment's condition and Event.
        engine = AsyncEngine(Engine(EngineConfig(**model.replica_engine_kwargs())))
        replica_id = serve.get_replica_context().replica_id.unique_id
        self.replica = EngineReplica(engine, replica_id)
        self.latency = LatencyWindow()
        self._preemptions = (time.monotonic(), 0)  # (when, count) at the last autoscaling push
        log.info("worker %s serves %s from %s", replica_id, model.name, model.uri)

    async def generate_batch(self, jobs: list[GenerateJob], exclude_replica: str | None = None
                             ) -> AsyncIterator[StreamItem]:
        start, waiting_first = time.monotonic(), set(range(len(jobs)))
        async for item in self.replica.generate_batch(jobs):
            index, chunk = item
            if index >= 0:  # a Chunk: feed the latency signals (TTFT at its first token, ITL at its end)
                if index in waiting_first and (chunk.token_ids or chunk.finished):
                    waiting_first.discard(index)
                    if chunk.token_ids:
                        now = time.monotonic()
                        self.latency.first_token(now - start, now)
                if chunk.finished:
                    self.latency.finished(chunk.timings, chunk.completion_tokens, time.monotonic())
            yield item

    async def abort(self, request_id: str, pin_replica: str | None = None) -> None:
        self.replica.abort(request_id)

    async def report(self, pin_replica: str | None = None) -> ReplicaReport:
        """This replica's load once the adds and aborts already sent have reached the engine (the
        router asks when its last stream here ends, so an idle replica's gauges read zero)."""
        return await self.replica.settled_report()

    def record_routing_stats(self) -> dict[str, Any]:
        r = self.replica.report()
        return {"num_requests_waiting": r.num_requests_waiting, "num_requests_running": r.num_requests_running,
                "kv_cache_usage": r.kv_cache_usage}

    def record_autoscaling_stats(self) -> dict[str, float]:
        """The custom metrics ``kubeinfer.serve.autoscaling``'s policies read (see replica_stats)."""
        r = self.replica.report()
        now = time.monotonic()
        then, count = self._preemptions
        self._preemptions = (now, r.num_preemptions)
        rate = max(0, r.num_preemptions - count) / (now - then) if now > then else 0.0
        return replica_stats(r, rate, self.latency.p90(now))

    def check_health(self) -> None:
        if not self.replica.engine.alive():
            raise RuntimeError("the engine's step thread has stopped")

    def __del__(self) -> None:
        replica = getattr(self, "replica", None)
        if replica is not None:
            replica.engine.shutdown(timeout=5.0)
