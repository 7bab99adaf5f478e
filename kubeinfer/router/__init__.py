"""Request routing: replica-selection policies, admission control and micro-batching.

Pure Python policy logic (no Ray, gRPC or torch), shared by the gRPC servicer and the Ray Serve
request router.
"""

from kubeinfer.router.admission import Admission, AdmissionController, Rejected
from kubeinfer.router.batching import MicroBatcher
from kubeinfer.router.policies import (
    POLICIES,
    LeastLoaded,
    NoReplicaAvailable,
    PowerOfTwoChoices,
    PrefixAffinity,
    ReplicaStats,
    RoundRobin,
    RoutingPolicy,
    make_policy,
    prefix_block_hashes,
)

__all__ = [
    "Admission", "AdmissionController", "Rejected", "MicroBatcher", "POLICIES", "LeastLoaded",
    "NoReplicaAvailable", "PowerOfTwoChoices", "PrefixAffinity", "ReplicaStats", "RoundRobin",
    "RoutingPolicy", "make_policy", "prefix_block_hashes",
]
