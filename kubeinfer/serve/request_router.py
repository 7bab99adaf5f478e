"""Our routing policies plugged into Ray Serve's request-router hook for the Worker deployments."""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from kubeinfer.router.policies import ReplicaStats, make_policy


class PolicyRequestRouter(RequestRouter):
    """Ranks a Worker deployment's replicas with one of ``kubeinfer.router.policies``.

    Owns the policy and this handle's count of outstanding calls per replica (counted from
    ``on_request_routed`` to ``on_request_completed``, never below zero); queue length and KV
    usage come from the replicas' ``record_routing_stats``. Two call options ride in the request's
    keyword arguments: ``pin_replica`` (an abort must reach the replica running the request) and
    ``exclude_replica`` (a retry avoids the replica that just failed, unless it is the only one).
    A replica whose call Serve saw fail as unavailable is avoided for ``UNAVAILABLE_HOLD_S`` too:
    Serve keeps a killed replica among the candidates until its controller notices the death,
    and a retry whose failed replica was never named (it died before its first report) would
    otherwise go back to it.
    """

    UNAVAILABLE_HOLD_S = 5.0

    def initialize_state(self, policy: str = "power_of_two", **policy_kwargs: Any) -> None:
        self.policy = make_policy(policy, **policy_kwargs)
        self.outstanding: defaultdict[str, int] = defaultdict(int)
        self.unavailable_since: dict[str, float] = {}

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        kwargs = pending_request.kwargs if pending_request is not None else {}
        pin = kwargs.get("pin_replica")
        if pin is not None:
            pinned = [r for r in candidate_replicas if r.replica_id.unique_id == pin]
            return [pinned] if pinned else [candidate_replicas]  # gone: an abort anywhere is a no-op
        avoid = self._avoided(kwargs.get("exclude_replica"), candidate_replicas)
        stats = []
        for r in candidate_replicas:
            rid = r.replica_id.unique_id
            reported = r.routing_stats or {}
            stats.append(ReplicaStats(rid, self.outstanding[rid], int(reported.get("num_requests_waiting", 0)),
                                      float(reported.get("kv_cache_usage", 0.0)), healthy=rid not in avoid))
        prompt = _prompt_token_ids(pending_request)
        chosen_id = self.policy.choose(stats, prompt).replica_id
        chosen = [r for r in candidate_replicas if r.replica_id.unique_id == chosen_id]
        rest = [r for r in candidate_replicas if r.replica_id.unique_id != chosen_id and r.replica_id.unique_id not in avoid]
        return [chosen, rest] if rest else [chosen]

    def _avoided(self, exclude: str | None, candidates: list[RunningReplica]) -> set[str]:
        """The excluded replica and those recently unavailable; none if that would leave no replica."""
        now = time.monotonic()
        for rid, since in list(self.unavailable_since.items()):
            if now - since > self.UNAVAILABLE_HOLD_S:
                del self.unavailable_since[rid]
        avoid = set(self.unavailable_since)
        if exclude is not None:
            avoid.add(exclude)
        if all(r.replica_id.unique_id in avoid for r in candidates):
            return set()
        return avoid

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        self.outstanding[replica_id.unique_id] += 1

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        rid = replica_id.unique_id
        self.outstanding[rid] = max(0, self.outstanding[rid] - 1)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.outstanding.pop(replica_id.unique_id, None)
        self.unavailable_since.pop(replica_id.unique_id, None)

    def on_replica_actor_unavailable(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_unavailable(replica_id)
        self.unavailable_since[replica_id.unique_id] = time.monotonic()


def _prompt_token_ids(pending_request: PendingRequest | None) -> list[int] | None:
    """The first job's prompt, for prefix affinity (a batch call's args are ``(jobs,)``)."""
    if pending_request is None or not pending_request.args:
        return None
    jobs = pending_request.args[0]
    if isinstance(jobs, list) and jobs and hasattr(jobs[0], "prompt_token_ids"):
        return jobs[0].prompt_token_ids
    return None
