"""What the CR says about autoscaling: ``status.autoscaling`` (the policy and its last scale change)
and the Event for each change.

Serve decides; the operator only sees the outcome, the deployment's target replica count in Serve's
status (``target_num_replicas``). Ray 2.60 does not expose the policy's reasons through its REST API
(``autoscaling_detail`` is declared but never filled), so the reason with the figures behind it is in
the Serve controller's log, where ``kubeinfer.serve.autoscaling`` writes it on each change of mind.
"""

from __future__ import annotations

from typing import Any, Mapping

from kubeinfer.operator.autoscaling_spec import DEFAULT_POLICY
from kubeinfer.operator.spec import ModelDeploymentSpec


def policy_name(spec: ModelDeploymentSpec) -> str | None:
    """The policy's CRD name, or None for a deployment with a fixed replica count."""
    if spec.autoscaling is None:
        return None
    return spec.autoscaling.policy.policy if spec.autoscaling.policy is not None else DEFAULT_POLICY


def scale_change(spec: ModelDeploymentSpec, current: Mapping[str, Any], replicas: int,
                 now: str) -> tuple[dict[str, Any] | None, str | None]:
    """(the new ``status.autoscaling``, the Event message) when the target replica count moved from
    ``current['replicas']`` to ``replicas`` under autoscaling; (None, None) when nothing changed.
    A first observation (no count yet) records the policy without an Event."""
    policy = policy_name(spec)
    if policy is None:
        return None, None
    before = current.get("replicas")
    previous = current.get("autoscaling") or {}
    if before is None or before == replicas:
        if previous.get("policy") == policy:
            return None, None
        return {**previous, "policy": policy}, None
    change = f"{before} -> {replicas}"
    message = f"{policy}: {change} replicas ({'up' if replicas > before else 'down'})"
    return {"policy": policy, "lastScale": change, "lastScaleTime": now}, message
