"""The policy's reasons in the CR's status (issue 15, surfaces): what ``scale_change`` makes of a
published decision, when the policy publishes one, and the operator's setting for where Serve's HTTP
proxy listens. The whole path on a real local Ray (policy -> Ray's internal KV -> the router's
``/kubeinfer/autoscaling`` -> the operator's client) is checked in tests/test_autoscaling.py's
kvCache end-to-end test; the operator's status and Event against kmock in tests/test_operator_kmock.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from kubeinfer.operator.autoscaling_status import scale_change
from kubeinfer.operator.settings import OperatorConfig
from kubeinfer.operator.spec import parse_spec
from kubeinfer.serve import autoscaling
from kubeinfer.serve.autoscaling import RECENT_DECISIONS, RUNNING, WAITING, PolicySettings, decide

NOW = "2026-12-07T12:00:00Z"
UP = {"policy": "kvCache", "reason": "kvCache 0.86 vs 0.70", "from": 2, "to": 3, "time": 1796601600.0}


def _spec(policy: str | None = "kvCache"):
    auto = {"maxReplicas": 4, **({"policy": policy} if policy else {})}
    return parse_spec({"apiVersion": "kubeinfer.io/v1alpha1", "kind": "ModelDeployment",
                       "metadata": {"name": "demo", "namespace": "ml", "uid": "u-1", "generation": 1},
                       "spec": {"autoscaling": auto}})


def test_the_decision_that_moved_the_count_gives_the_status_and_the_event_its_reason():
    current = {"replicas": 2, "autoscaling": {"policy": "kvCache"}}
    auto, event = scale_change(_spec(), current, 3, NOW, [UP])
    assert auto == {"policy": "kvCache", "lastScale": "2 -> 3", "lastScaleTime": NOW,
                    "lastDecision": "kvCache 0.86 vs 0.70: 2 -> 3", "lastDecisionTime": "2026-12-07T00:00:00Z"}
    assert event == "kvCache: 2 -> 3 replicas (up): kvCache 0.86 vs 0.70"
    # Nothing new: nothing to write.
    assert scale_change(_spec(), {"replicas": 3, "autoscaling": auto}, 3, NOW, [UP]) == (None, None)


def test_the_event_finds_the_decision_that_made_the_change_after_the_policy_changed_its_mind():
    """The operator looks every 10 s: by then the load may be gone and the newest decision a
    scale-down Serve's delay holds back. The status shows that one; the Event the one that scaled."""
    down = {**UP, "reason": "kvCache 0.10 vs 0.70", "from": 3, "to": 2, "time": UP["time"] + 5}
    older = {**UP, "reason": "kvCache 0.95 vs 0.70", "from": 1, "to": 3, "time": UP["time"] - 600}
    auto, event = scale_change(_spec(), {"replicas": 2}, 3, NOW, [older, UP, down])
    assert event == "kvCache: 2 -> 3 replicas (up): kvCache 0.86 vs 0.70"
    assert auto["lastDecision"] == "kvCache 0.10 vs 0.70: 3 -> 2"
    # A change seen without its first step (1 -> 2 -> 3 seen as 1 -> 3): the newest decision to 3.
    assert scale_change(_spec(), {"replicas": 1}, 3, NOW, [UP])[1] == "kvCache: 1 -> 3 replicas (up): kvCache 0.86 vs 0.70"


def test_a_decision_not_yet_acted_on_is_shown_without_an_event_and_kept_while_the_router_is_silent():
    current = {"replicas": 2, "autoscaling": {"policy": "kvCache", "lastScale": "1 -> 2", "lastScaleTime": NOW}}
    auto, event = scale_change(_spec(), current, 2, NOW, [UP])  # Serve's upscale delay still runs
    assert event is None and auto["lastDecision"] == "kvCache 0.86 vs 0.70: 2 -> 3"
    assert auto["lastScale"] == "1 -> 2"
    # The router unreachable (no decision): the status keeps what it has.
    assert scale_change(_spec(), {"replicas": 2, "autoscaling": auto}, 2, NOW, []) == (None, None)
    # A change the decision does not explain (Serve's min/max, a manual edit): no reason claimed.
    auto, event = scale_change(_spec(), {"replicas": 2, "autoscaling": auto}, 1, NOW, [UP])
    assert event == "kvCache: 2 -> 1 replicas (down)" and auto["lastScale"] == "2 -> 1"


def test_ray_default_policy_has_no_decision_to_show():
    auto, event = scale_change(_spec(None), {"replicas": 1, "autoscaling": {"policy": "ongoingRequests"}}, 2, NOW)
    assert event == "ongoingRequests: 1 -> 2 replicas (up)" and "lastDecision" not in auto


def test_the_policy_publishes_each_change_of_mind_once_and_at_once(monkeypatch, caplog):
    """Each new (current, desired) once, however soon after the last: Serve may act on a decision
    within a tick, and a wish it has carried out is not wished again. The log is throttled instead."""
    import logging
    calls = []
    monkeypatch.setattr(autoscaling, "publish_decisions", lambda app, dep, records: calls.append(records))
    settings = PolicySettings(policy="queue", target_queue_length=1)
    ids = ["r0", "r1"]
    state: dict = {}

    def tick(t: float, target: int, waiting: float) -> int:
        nonlocal state
        ctx = SimpleNamespace(running_replicas=ids, target_num_replicas=target, policy_state=state,
                              capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=10,
                              aggregated_metrics={WAITING: {r: waiting for r in ids}, RUNNING: {r: 1.0 for r in ids}},
                              raw_metrics={}, current_time=t, deployment_name="worker-m", app_name="ml.demo")
        desired, state = decide(ctx, settings)
        return desired

    def published() -> list[dict]:
        return [c[-1] for c in calls]

    with caplog.at_level(logging.INFO, logger="ray.serve"):
        assert tick(0.0, 2, 3.0) == 6                 # 2 -> 6: published
        assert tick(1.0, 2, 3.0) == 6                 # the same wish on the next tick: not again
        assert [(r["from"], r["to"]) for r in published()] == [(2, 6)]
        assert published()[0]["reason"].startswith("queue 3.00/replica") and published()[0]["time"] == 0.0
        down = tick(2.0, 6, 0.0)                      # Serve scaled to 6; the load is gone 1 s later
        assert down < 6 and [(r["from"], r["to"]) for r in published()] == [(2, 6), (6, down)]
        assert calls[-1] == published()  # each put holds the recent ones, oldest first
        logged = [r.getMessage() for r in caplog.records if "kubeinfer autoscaling" in r.getMessage()]
        assert len(logged) == 1 and "2 -> 6" in logged[0]  # the second change came within 10 s of the first
        for target in range(7, 7 + 2 * RECENT_DECISIONS):  # many more changes: the list stays bounded
            tick(20.0 + target, target, 3.0)
        assert len(calls) > RECENT_DECISIONS and calls[-1] == published()[-RECENT_DECISIONS:]


def test_publishing_and_reading_need_ray_and_do_nothing_without_it(monkeypatch):
    monkeypatch.setattr(autoscaling, "_internal_kv", lambda: None)
    autoscaling.publish_decisions("ml.demo", "worker-m", [UP])  # no error: the simulator and unit tests run it
    assert autoscaling.read_decisions("ml.demo", "worker-m") == []


def test_the_operator_reads_where_serves_http_proxy_listens():
    assert OperatorConfig.from_env({}).serve_http_port == 8000
    assert OperatorConfig.from_env({"KUBEINFER_SERVE_HTTP_PORT": "8080"}).serve_http_port == 8080
    for bad in ("http", "0", "70000"):
        with pytest.raises(ValueError, match="KUBEINFER_SERVE_HTTP_PORT|serve_http_port"):
            OperatorConfig.from_env({"KUBEINFER_SERVE_HTTP_PORT": bad})


def test_a_rayservices_dashboard_is_its_kuberay_head_service():
    """KubeRay names the head Service it keeps for a RayService ``<name>-head-svc`` (cut to 50
    characters from the end, a leading digit replaced by ``r``: its CheckName)."""
    from kubeinfer.operator.render import rayservice_head_service
    from kubeinfer.operator.settings import DEFAULT_KUBERAY_DASHBOARD
    from kubeinfer.operator.targets import KubeRayTarget
    assert rayservice_head_service("chat") == "chat-head-svc"
    long = "a" * 45 + "-model"
    assert rayservice_head_service(long) == (long + "-head-svc")[-50:] and len(rayservice_head_service(long)) == 50
    assert rayservice_head_service("7b-chat") == "rb-chat-head-svc"
    spec = parse_spec({"metadata": {"name": "chat", "namespace": "ml"}, "spec": {"autoscaling": {"maxReplicas": 2}}})
    target = KubeRayTarget(None, serve_client=lambda address: address, dashboard=DEFAULT_KUBERAY_DASHBOARD)
    assert target._serve_api(spec) == "http://chat-head-svc.ml.svc:8265"
    assert KubeRayTarget(None, serve_client=lambda address: address)._serve_api(spec) is None  # not configured
    assert OperatorConfig.from_env({"KUBEINFER_KUBERAY_DASHBOARD": ""}).kuberay_dashboard is None
    with pytest.raises(ValueError, match="kuberay_dashboard"):
        OperatorConfig(kuberay_dashboard="http://{head}:8265")
