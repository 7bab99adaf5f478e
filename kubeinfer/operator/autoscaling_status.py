"""What the CR says about autoscaling: ``status.autoscaling`` (the policy, its last scale change and
its last decision with the reason) and the Event for each change.

Serve decides; the operator sees the outcome, the deployment's target replica count in Serve's status
(``target_num_replicas``). Ray 2.60 does not expose a policy's reasons through its REST API
(``autoscaling_detail`` is declared but never filled), so kubeinfer's policy publishes each decision
(``kubeinfer.serve.autoscaling.publish_decisions``, the last few) and the application's router
serves them; the operator reads them there (``Target.autoscaling_decisions``). Ray's default policy
publishes none.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from kubeinfer.operator.autoscaling_spec import DEFAULT_POLICY
from kubeinfer.operator.spec import ModelDeploymentSpec
from kubeinfer.operator.status import rfc3339


def policy_name(spec: ModelDeploymentSpec) -> str | None:
    """The policy's CRD name, or None for a deployment with a fixed replica count."""
    if spec.autoscaling is None:
        return None
    return spec.autoscaling.policy.policy if spec.autoscaling.policy is not None else DEFAULT_POLICY


def scale_change(spec: ModelDeploymentSpec, current: Mapping[str, Any], replicas: int, now: str,
                 decisions: Sequence[Mapping[str, Any]] = ()) -> tuple[dict[str, Any] | None, str | None]:
    """(the new ``status.autoscaling``, the Event message) when the target replica count moved from
    ``current['replicas']`` to ``replicas`` under autoscaling, or the policy published a new decision
    (``decisions``: its recent ones, oldest first, each with ``reason``, ``from``, ``to``, ``time``);
    (None, None) when nothing changed. A first observation (no count yet) records the policy without
    an Event. ``lastDecision`` is the newest decision; the Event names the reason of the newest one
    that made this change (by then the policy may have changed its mind again)."""
    policy = policy_name(spec)
    if policy is None:
        return None, None
    before = current.get("replicas")
    previous = dict(current.get("autoscaling") or {})
    auto = {**previous, "policy": policy}
    explained = [d for d in decisions if d.get("reason")]
    if explained:
        newest = explained[-1]
        auto["lastDecision"] = f"{newest['reason']}: {newest.get('from')} -> {newest.get('to')}"
        if isinstance(newest.get("time"), (int, float)):
            auto["lastDecisionTime"] = rfc3339(float(newest["time"]))
    message = None
    if before is not None and before != replicas:
        auto["lastScale"], auto["lastScaleTime"] = f"{before} -> {replicas}", now
        message = f"{policy}: {before} -> {replicas} replicas ({'up' if replicas > before else 'down'})"
        made = [d for d in explained if d.get("to") == replicas]
        made = [d for d in made if d.get("from") == before] or made  # the operator may have missed a step
        if made:
            message += f": {made[-1]['reason']}"
    return (auto, message) if auto != previous else (None, None)
