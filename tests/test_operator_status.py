"""The operator's pure parts: status from a RayService or the Serve API, condition transitions,
the Serve REST API's read-merge-put bodies, and the operator's settings."""

from __future__ import annotations

import pytest

from kubeinfer.operator.serve_api import config_with, config_without, grpc_endpoint
from kubeinfer.operator.settings import OperatorConfig
from kubeinfer.operator.status import (
    Observation, merge_conditions, observe_rayservice, observe_serve_application, status_fields)


def rayservice(app_status: str | None, **deployments: str) -> dict:
    if app_status is None:
        return {"status": {}}
    app = {"status": app_status, "message": "",
           "serveDeploymentStatuses": {name: {"status": s} for name, s in deployments.items()}}
    return {"status": {"activeServiceStatus": {"applicationStatuses": {"chat": app},
                                               "rayClusterStatus": {"readyWorkerReplicas": 1}}}}


@pytest.mark.parametrize("body, phase, reason, ready", [
    (None, "Pending", "RayServiceMissing", 0),
    (rayservice(None), "Deploying", "Deploying", 0),
    (rayservice("DEPLOYING", router="UPDATING"), "Deploying", "Deploying", 1),
    (rayservice("RUNNING", router="HEALTHY", worker="HEALTHY"), "Ready", "ApplicationRunning", 3),
    (rayservice("RUNNING", router="HEALTHY", worker="UPSCALING"), "Deploying", "Scaling", 1),
    (rayservice("UNHEALTHY", router="HEALTHY", worker="UNHEALTHY"), "Degraded", "Unhealthy", 1),
    (rayservice("DEPLOY_FAILED", worker="DEPLOY_FAILED"), "Failed", "DeployFailed", 0),
])
def test_phase_from_a_rayservice(body, phase, reason, ready):
    obs = observe_rayservice(body, "chat", replicas=3)
    assert (obs.phase, obs.reason, obs.replicas, obs.ready_replicas) == (phase, reason, 3, ready)


def test_a_pending_upgrade_is_read_when_no_application_is_active():
    body = {"status": {"pendingServiceStatus": {"applicationStatuses": {"chat": {
        "status": "RUNNING", "serveDeploymentStatuses": {"router": {"status": "HEALTHY"}}}}}}}
    assert observe_rayservice(body, "chat", replicas=1).phase == "Ready"


def serve_details(status: str, running: int) -> dict:
    return {"applications": {"chat": {"status": status, "message": "", "deployments": {
        "router": {"status": "HEALTHY", "target_num_replicas": 1, "replicas": [{"state": "RUNNING"}]},
        "worker-m": {"status": "HEALTHY" if running == 2 else "UPDATING", "target_num_replicas": 2,
                     "replicas": [{"state": "RUNNING"}] * running + [{"state": "STARTING"}] * (2 - running)}}}}}


def test_serve_api_counts_only_the_worker_replicas():
    obs = observe_serve_application(serve_details("RUNNING", 2), "chat", ["worker-m"])
    assert (obs.phase, obs.replicas, obs.ready_replicas) == ("Ready", 2, 2)
    obs = observe_serve_application(serve_details("DEPLOYING", 1), "chat", ["worker-m"])
    assert (obs.phase, obs.replicas, obs.ready_replicas) == ("Deploying", 2, 1)
    assert observe_serve_application({"applications": {}}, "chat").phase == "Pending"


def test_last_transition_time_moves_only_on_a_transition():
    old = [{"type": "Ready", "status": "False", "lastTransitionTime": "T0"},
           {"type": "Degraded", "status": "False", "lastTransitionTime": "T0"}]
    new = [{"type": "Ready", "status": "True", "reason": "ApplicationRunning", "message": ""},
           {"type": "Degraded", "status": "False", "reason": "ApplicationRunning", "message": ""}]
    merged = {c["type"]: c["lastTransitionTime"] for c in merge_conditions(old, new, "T1")}
    assert merged == {"Ready": "T1", "Degraded": "T0"}


def test_status_fields_for_a_ready_deployment():
    fields = status_fields({}, Observation("Ready", "ApplicationRunning", "2/2", 2, 2), 4, "x:9000", "T")
    assert {k: v for k, v in fields.items() if k != "conditions"} == {
        "observedGeneration": 4, "phase": "Ready", "replicas": 2, "readyReplicas": 2, "endpoint": "x:9000"}
    assert [(c["type"], c["status"]) for c in fields["conditions"]] == [
        ("Ready", "True"), ("Progressing", "False"), ("Degraded", "False")]


def deployed(*names: str) -> dict:
    return {"http_options": {"host": "0.0.0.0", "port": 8000}, "applications": {
        n: {"name": n, "deployed_app_config": {"name": n, "import_path": f"{n}:app"}} for n in names}}


def test_put_bodies_keep_the_other_applications():
    ours = {"http_options": {"port": 8000}, "applications": [{"name": "b", "import_path": "new:app"}]}
    body = config_with(deployed("a", "b"), ours)
    assert body["applications"] == [{"name": "a", "import_path": "a:app"}, {"name": "b", "import_path": "new:app"}]
    assert body["http_options"] == {"port": 8000}
    removed = config_without(deployed("a", "b"), "b")
    assert removed["applications"] == [{"name": "a", "import_path": "a:app"}]
    assert removed["http_options"] == {"host": "0.0.0.0", "port": 8000}
    assert config_without(deployed("a"), "b") is None


def test_grpc_endpoint_is_the_dashboard_host():
    assert grpc_endpoint("http://ray-head.ray.svc:8265/", 9000) == "ray-head.ray.svc:9000"
    assert grpc_endpoint("10.0.0.7:8265", 9000) == "10.0.0.7:9000"


def test_settings_from_the_environment_and_flags():
    env = {"KUBEINFER_OPERATOR_MODE": "serve-api", "KUBEINFER_RAY_ADDRESS": "http://ray:8265"}
    assert OperatorConfig.from_env(env) == OperatorConfig(mode="serve-api", ray_address="http://ray:8265")
    assert OperatorConfig.from_env(env, mode="kuberay", ray_address=None).mode == "kuberay"
    with pytest.raises(ValueError, match="operator mode"):
        OperatorConfig.from_env({"KUBEINFER_OPERATOR_MODE": "sideways"})
