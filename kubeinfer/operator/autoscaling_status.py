"""What the CR says about autoscaling: ``status.autoscaling`` (the policy, its last scale change and
its last decision with the reason) and the Event for each change.

Serve decides; the operator sees the outcome, the deployment's target replica count in Serve's status
(``target_num_replicas``). Ray 2.60 does not expose a policy's reasons through its REST API
(``autoscaling_detail`` is declared but never filled), so kubeinfer's policy publishes each decision
(``kubeinfer.serve.autoscaling.publish_decision``) and the application's router serves it; the
operator reads it there (``Target.autoscaling_decision``). Ray's default policy publishes none.
"""

from __future__ import annotations

from typing import Any, Mapping

from kubeinfer.operator.autoscaling_spec import DEFAULT_POLICY
from kubeinfer.operator.spec import ModelDeploymentSpec
from kubeinfer.operator.status import rfc3339


def policy_name(spec: ModelDeploymentSpec) -> str | None:
    """The policy's CRD name, or None for a deployment with a fixed replica count."""
    if spec.autoscaling is None:
        return None
    return spec.autoscaling.policy.policy if spec.autoscaling.policy is not None else DEFAULT_POLICY


def scale_change(spec: ModelDeploymentSpec, current: Mapping[str, Any], replicas: int, now: str,
                 decision: Mapping[str, Any] | None = None) -> tuple[dict[str, Any] | None, str | None]:
    """(the new ``status.autoscaling``, the Event message) when the target replica count moved from
    ``current['replicas']`` to ``replicas`` under autoscaling, or the policy published a new
    ``decision`` (its ``reason``, ``from``, ``to``, ``time``); (None, None) when nothing changed.
    A first observation (no count yet) records the policy without an Event. The Event names the
    reason when the decision is the one that moved the count."""
    policy = policy_name(spec)
    if policy is None:
        return None, None
    before = current.get("replicas")
    previous = dict(current.get("autoscaling") or {})
    auto = {**previous, "policy": policy}
    why = None
    if decision and decision.get("reason"):
        why = str(decision["reason"])
        auto["lastDecision"] = f"{why}: {decision.get('from')} -> {decision.get('to')}"
        if isinstance(decision.get("time"), (int, float)):
            auto["lastDecisionTime"] = rfc3339(float(decision["time"]))
    message = None
    if before is not None and before != replicas:
        auto["lastScale"], auto["lastScaleTime"] = f"{before} -> {replicas}", now
        message = f"{policy}: {before} -> {replicas} replicas ({'up' if replicas > before else 'down'})"
        if why is not None and decision.get("to") == replicas:
            message += f": {why}"
    return (auto, message) if auto != previous else (None, None)
