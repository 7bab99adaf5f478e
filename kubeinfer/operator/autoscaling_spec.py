"""``spec.autoscaling.policy`` and its targets: which autoscaling policy scales the model's worker
replicas (kubeinfer.serve.autoscaling) and the values it holds them to.

The CRD's schema and CEL rules refuse the same things; this parser repeats them because the operator
cannot rely on the API server having the CRD (see kubeinfer.operator.spec). Every refusal is a
ValueError whose message names the field; the caller turns it into SpecError.
"""

from __future__ import annotations

from typing import Any, Mapping

from kubeinfer.serve.autoscaling import POLICIES, PolicySettings

DEFAULT_POLICY = "ongoingRequests"  # Ray Serve's own policy, unchanged
# CRD field -> (PolicySettings field, the policies that read it).
TARGETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "targetKvCacheUsage": ("target_kv_cache_usage", ("kvCache",)),
    "targetQueueLength": ("target_queue_length", ("queue",)),
    "ttftSeconds": ("ttft_seconds", ("latency",)),
}


def parse_policy(auto: Mapping[str, Any]) -> PolicySettings | None:
    """The LLM policy ``spec.autoscaling`` asks for, or None for ``ongoingRequests`` (Ray's default).

    Refuses an unknown policy, a target of the wrong type or range, and a target the chosen policy
    does not read (it would be silently ignored)."""
    policy = auto.get("policy") or DEFAULT_POLICY
    if policy not in POLICIES:
        raise ValueError(f"spec.autoscaling.policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    kwargs: dict[str, Any] = {"policy": policy}
    for key, (name, readers) in TARGETS.items():
        value = auto.get(key)
        if value is None:
            continue
        where = f"spec.autoscaling.{key}"
        if policy not in readers:
            raise ValueError(f"{where} is only read by policy {' or '.join(readers)}, not {policy}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where} must be a number, got {value!r}")
        if name == "target_kv_cache_usage" and not 0 < value <= 1:
            raise ValueError(f"{where} must be in (0, 1], got {value!r}")
        if not value > 0:
            raise ValueError(f"{where} must be > 0, got {value!r}")
        kwargs[name] = float(value)
    if policy == DEFAULT_POLICY:
        return None
    return PolicySettings(**kwargs)
