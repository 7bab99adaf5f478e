"""The pool of in-process replicas: the router picks one with a routing policy (no Ray)."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Sequence

from kubeinfer.local.replica import EngineReplica
from kubeinfer.router.policies import ReplicaStats, RoutingPolicy
from kubeinfer.router.pool import WorkerPool
from kubeinfer.router.types import GenerateJob, ReplicaFailed, ReplicaReport, StreamItem


class LocalPool(WorkerPool):
    """In-process replicas, picked by a routing policy on this pool's outstanding counts and the
    replicas' live reports. Owns the replicas (and shuts their engines down)."""

    def __init__(self, replicas: Sequence[EngineReplica], policy: RoutingPolicy) -> None:
        super().__init__()
        self.replicas = {r.replica_id: r for r in replicas}
        self.policy = policy
        self.outstanding = {r.replica_id: 0 for r in replicas}

    def _choose(self, job: GenerateJob, exclude: str | None) -> EngineReplica:
        stats = []
        for rid, replica in self.replicas.items():
            report = replica.report()
            stats.append(ReplicaStats(rid, self.outstanding[rid], report.num_requests_waiting,
                                      report.kv_cache_usage, healthy=rid != exclude or len(self.replicas) == 1))
        return self.replicas[self.policy.choose(stats, job.prompt_token_ids).replica_id]

    async def _call(self, jobs: list[GenerateJob], exclude: str | None) -> AsyncIterator[StreamItem]:
        replica = self._choose(jobs[0], exclude)
        self.outstanding[replica.replica_id] += len(jobs)
        try:
            async for item in replica.generate_batch(jobs):
                yield item
        except (ReplicaFailed, asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as e:  # name the replica: it may have failed before reporting itself
            raise ReplicaFailed(f"replica {replica.replica_id} failed: {type(e).__name__}: {e}",
                                replica.replica_id) from e
        finally:
            self.outstanding[replica.replica_id] -= len(jobs)

    async def abort(self, replica_id: str, request_id: str) -> None:
        self.replicas[replica_id].abort(request_id)

    def fresh_reports(self, max_age_s: float = 60.0) -> list[ReplicaReport]:
        # In process, the engines themselves are at hand: read them at scrape time, never a copy.
        return [r.report() for r in self.replicas.values()]

    async def refresh_report(self, replica_id: str) -> ReplicaReport | None:
        return await self.replicas[replica_id].settled_report()

    def shutdown(self) -> None:
        for replica in self.replicas.values():
            replica.engine.shutdown()
