"""Replica-selection policies for the router.

Pure policy logic: no Ray, gRPC or torch, so the gRPC servicer and the Ray Serve request router can
share it and it can be tested without either.
"""

from __future__ import annotations

import hashlib
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Sequence


class NoReplicaAvailable(RuntimeError):
    """Raised by :meth:`RoutingPolicy.choose` when no healthy replica is offered."""


@dataclass
class ReplicaStats:
    """A snapshot of one replica, as the router sees it.

    ``outstanding`` is counted by this router (sent and not finished); ``queue_len`` and ``kv_usage``
    are as last reported by the replica's engine, so they may be stale.
    """

    replica_id: str
    outstanding: int = 0
    queue_len: int = 0
    kv_usage: float = 0.0  # fraction of KV blocks in use, in [0, 1]
    healthy: bool = True


def healthy_replicas(replicas: Sequence[ReplicaStats]) -> list[ReplicaStats]:
    """The healthy ones, in the given order; :class:`NoReplicaAvailable` if there are none."""
    healthy = [r for r in replicas if r.healthy]
    if not healthy:
        raise NoReplicaAvailable(f"no healthy replica among {len(replicas)}")
    return healthy


class RoutingPolicy(ABC):
    """Chooses one replica per request.

    Invariant: :meth:`choose` only ever returns a healthy replica from the sequence it was given
    (the same object), or raises :class:`NoReplicaAvailable`. Policies keep at most small state of
    their own (a counter); replica load is always passed in, never cached.
    """

    def choose(self, replicas: Sequence[ReplicaStats],
               prompt_token_ids: Sequence[int] | None = None) -> ReplicaStats:
        return self._pick(healthy_replicas(replicas), prompt_token_ids)

    @abstractmethod
    def _pick(self, healthy: list[ReplicaStats], prompt_token_ids: Sequence[int] | None) -> ReplicaStats:
        """Pick from a non-empty list of healthy replicas."""


class RoundRobin(RoutingPolicy):
    """Cycles through the healthy replicas in the order given; owns only a counter.

    When the set of healthy replicas changes the cycle continues from the counter, so the order may
    skip or repeat once; over time every healthy replica gets an equal share.
    """

    def __init__(self) -> None:
        self._next = 0

    def _pick(self, healthy: list[ReplicaStats], prompt_token_ids: Sequence[int] | None) -> ReplicaStats:
        chosen = healthy[self._next % len(healthy)]
        self._next += 1
        return chosen


class PowerOfTwoChoices(RoutingPolicy):
    """Samples two distinct healthy replicas and takes the less loaded one.

    Load is this router's own ``outstanding`` count (always fresh), ties broken by the reported
    ``queue_len``. Sampling two instead of scanning all avoids herding onto one replica when many
    routers act on the same stale reports. Owns only its ``rng``.
    """

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng if rng is not None else random.Random()

    def _pick(self, healthy: list[ReplicaStats], prompt_token_ids: Sequence[int] | None) -> ReplicaStats:
        if len(healthy) == 1:
            return healthy[0]
        a, b = self.rng.sample(healthy, 2)
        return min((a, b), key=lambda r: (r.outstanding, r.queue_len))


class LeastLoaded(RoutingPolicy):
    """Takes the replica with the lowest :meth:`load` (first one given on ties). Stateless.

    ``kv_weight`` converts KV-cache usage into "requests": the default 4.0 makes a full cache weigh
    like four extra queued requests. A near-full cache means new work will wait for blocks (or
    preempt), so it should repel traffic, but usage is a coarse, stale signal and mostly reflects
    long sequences already admitted, so it must not outweigh the request counts; at low usage it
    effectively only breaks ties.
    """

    def __init__(self, kv_weight: float = 4.0) -> None:
        self.kv_weight = kv_weight

    def load(self, r: ReplicaStats) -> float:
        return r.outstanding + r.queue_len + self.kv_weight * r.kv_usage

    def _pick(self, healthy: list[ReplicaStats], prompt_token_ids: Sequence[int] | None) -> ReplicaStats:
        return min(healthy, key=self.load)


def prefix_block_hashes(token_ids: Sequence[int], block_size: int, num_blocks: int) -> list[int]:
    """Chained hashes of the leading full blocks (at most ``num_blocks``).

    The scheme is the KV cache's (``kubeinfer.worker.kv_cache``): ``hash((parent, tuple(block)))``
    from parent -1. Hashes of tuples of ints do not depend on PYTHONHASHSEED, so every router
    process computes the same keys.
    """
    hashes: list[int] = []
    parent = -1
    for i in range(min(num_blocks, len(token_ids) // block_size)):
        parent = hash((parent, tuple(token_ids[i * block_size:(i + 1) * block_size])))
        hashes.append(parent)
    return hashes


def _rendezvous_weight(key: int, replica_id: str) -> int:
    # hashlib rather than hash(): str hashes are salted per process, and routers must agree.
    digest = hashlib.blake2b(f"{key}:{replica_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class PrefixAffinity(RoutingPolicy):
    """Sends prompts sharing a prefix to the same replica, so its prefix cache gets the hits.

    The key is the chained hash of the prompt's first ``num_blocks`` full blocks of ``block_size``
    tokens (use the engine's block size so a key is a cacheable prefix). The replica is the one with
    the highest rendezvous weight for the key among the healthy ones: the mapping is stable, and
    removing a replica only moves the keys it owned (adding one only takes keys to it).

    Falls back to :class:`LeastLoaded` when the prompt has no full block, or when the affine replica's
    load exceeds the least-loaded one's by more than ``imbalance_threshold`` (in the load units of
    :meth:`LeastLoaded.load`): a cache hit does not pay for waiting behind a queue. Stateless.
    """

    def __init__(self, block_size: int = 16, num_blocks: int = 4, imbalance_threshold: float = 8.0,
                 kv_weight: float = 4.0) -> None:
        if block_size < 1 or num_blocks < 1:
            raise ValueError("block_size and num_blocks must be >= 1")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.imbalance_threshold = imbalance_threshold
        self.fallback = LeastLoaded(kv_weight)

    def affine_replica(self, healthy: Sequence[ReplicaStats], prompt_token_ids: Sequence[int]) -> ReplicaStats | None:
        """The replica owning this prompt's prefix key, or None if the prompt has no full block."""
        hashes = prefix_block_hashes(prompt_token_ids, self.block_size, self.num_blocks)
        if not hashes:
            return None
        key = hashes[-1]
        return max(healthy, key=lambda r: _rendezvous_weight(key, r.replica_id))

    def _pick(self, healthy: list[ReplicaStats], prompt_token_ids: Sequence[int] | None) -> ReplicaStats:
        least = self.fallback._pick(healthy, None)
        affine = self.affine_replica(healthy, prompt_token_ids or ())
        if affine is None:
            return least
        if self.fallback.load(affine) - self.fallback.load(least) > self.imbalance_threshold:
            return least
        return affine


POLICIES: dict[str, Callable[..., RoutingPolicy]] = {
    "power_of_two": PowerOfTwoChoices,  # the default first
    "least_loaded": LeastLoaded,
    "prefix_affinity": PrefixAffinity,
    "round_robin": RoundRobin,
}


def make_policy(name: str, **kwargs: Any) -> RoutingPolicy:
    """Build a policy by its configuration name; ``kwargs`` go to its constructor."""
    try:
        factory = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}; allowed: {', '.join(POLICIES)}") from None
    return factory(**kwargs)
