"""The router: validation and tokenization, replica-selection policies, admission control,
micro-batching, the gRPC and HTTP surfaces. No Ray imports (``kubeinfer.serve`` adds Ray).

This package namespace exports only the policy layer, which is pure Python (no gRPC or torch), so
the Ray Serve request router can import it cheaply.
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
