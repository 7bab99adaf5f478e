"""The operator's pure parts: status from a RayService or the Serve API, condition transitions,
the Serve REST API's read-merge-put bodies, and the operator's settings."""

from __future__ import annotations

import pytest

from kubeinfer.operator.serve_api import config_with, config_without, grpc_endpoint
from kubeinfer.operator.settings import OperatorConfig
from kubeinfer.operator.status import (
    Observation, merge_conditions, observe_rayservice, observe_serve_application, readable, status_fields)


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


# Ray Serve 2.60's deployment message after a Worker replica's engine asked for CUDA on a node without
# it, three times (captured from a real run; site-packages paths shortened).
NO_CUDA = "device 'cuda' was asked for, but this machine has no CUDA device that torch 2.13.0+cpu can use"
REPLICA_FAILED = (
    "The deployment failed to start 3 times in a row. This may be due to a problem with its constructor or "
    "initial health check failing. See controller logs for details. Error:\n"
    "\x1b[36mray::ServeReplica:ml.demo:worker-m.initialize_and_get_metadata()\x1b[39m (pid=5239, ip=192.0.2.2, "
    "actor_id=7c72235bc96ac568a458ec7b01000000, repr=<ray.serve._private.replica.ServeReplica:ml.demo:worker-m "
    "object at 0x7f9d31869050>)\n"
    '  File "/usr/lib/python3.11/concurrent/futures/_base.py", line 401, in __get_result\n'
    "    raise self._exception\n"
    "           ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n"
    '  File "ray/serve/_private/replica.py", line 1928, in initialize\n'
    "    raise RuntimeError(traceback.format_exc()) from None\n"
    "RuntimeError: Traceback (most recent call last):\n"
    '  File "ray/serve/_private/replica.py", line 4008, in _call_func_or_gen\n'
    "    result = callable(*args, **kwargs)\n"
    '  File "kubeinfer/serve/worker.py", line 31, in __init__\n'
    "    engine = AsyncEngine(Engine(EngineConfig(**model.replica_engine_kwargs())))\n"
    '  File "kubeinfer/worker/config.py", line 101, in resolve_device\n'
    '    raise ValueError(f"device {self.device!r} was asked for, but this machine has no CUDA device "\n'
    f"ValueError: {NO_CUDA} (torch.cuda.is_available() is False); use --device cpu or auto")
RETRYING = REPLICA_FAILED.replace("The deployment failed to start 3 times in a row.",
                                  "A replica failed to start with exception. Retrying 2 more time(s).")


def test_a_replica_traceback_becomes_its_sentence_and_its_exception():
    text = readable(REPLICA_FAILED)
    assert text.startswith("The deployment failed to start 3 times in a row.")
    assert text.endswith(f": ValueError: {NO_CUDA} (torch.cuda.is_available() is False); use --device cpu or auto")
    assert "\n" not in text and "\x1b" not in text and "File " not in text and "Traceback" not in text
    build = "Deploying app 'ml.demo' failed with exception:\nTraceback (most recent call last):\n" \
            '  File "kubeinfer/serve/app.py", line 40, in build_app\nValueError: model \'m\': no GPU'
    assert readable(build) == "Deploying app 'ml.demo' failed with exception: ValueError: model 'm': no GPU"
    waiting = "Deployment 'worker-m' has 1 replicas that have taken more than 30s to be scheduled.\nUse `ray status`."
    assert readable(waiting) == "Deployment 'worker-m' has 1 replicas that have taken more than 30s to be " \
                                "scheduled. Use `ray status`."
    assert readable(None) == readable("") == ""


def test_a_replica_that_cannot_start_fails_the_deployment_with_its_error():
    """Serve's application message only names the deployment; the replica's exception is in the
    deployment's, and that is what the Ready condition (and so the Warning Event) must say."""
    body = rayservice("DEPLOY_FAILED", router="HEALTHY", **{"worker-m": "DEPLOY_FAILED"})
    app = body["status"]["activeServiceStatus"]["applicationStatuses"]["chat"]
    app["message"] = "Failed to update the deployments ['worker-m']."
    app["serveDeploymentStatuses"]["worker-m"]["message"] = REPLICA_FAILED
    obs = observe_rayservice(body, "chat", replicas=1)
    assert (obs.phase, obs.reason) == ("Failed", "DeployFailed")
    assert obs.message.startswith("worker-m (DEPLOY_FAILED): The deployment failed to start 3 times")
    assert f"ValueError: {NO_CUDA}" in obs.message
    ready = {c["type"]: c for c in status_fields({}, obs, 1, None, "T")["conditions"]}["Ready"]
    assert (ready["status"], ready["reason"]) == ("False", "DeployFailed") and NO_CUDA in ready["message"]


def test_a_replica_failing_to_start_shows_while_serve_retries():
    details = serve_details("DEPLOYING", 0)
    details["applications"]["chat"]["deployments"]["worker-m"]["message"] = RETRYING
    obs = observe_serve_application(details, "chat", ["worker-m"])
    assert (obs.phase, obs.reason) == ("Deploying", "Deploying")
    assert obs.message.startswith("worker-m (UPDATING): A replica failed to start with exception. Retrying 2 more")
    assert obs.message.endswith("use --device cpu or auto")


def test_an_unhealthy_deployment_is_degraded_with_its_message():
    body = rayservice("UNHEALTHY", router="HEALTHY", **{"worker-m": "UNHEALTHY"})
    app = body["status"]["activeServiceStatus"]["applicationStatuses"]["chat"]
    app["message"] = "The deployments ['worker-m'] are UNHEALTHY."
    app["serveDeploymentStatuses"]["worker-m"]["message"] = "Replica failed health check: the engine's step thread has stopped"
    obs = observe_rayservice(body, "chat", replicas=2)
    assert (obs.phase, obs.reason) == ("Degraded", "Unhealthy")
    assert obs.message == "worker-m (UNHEALTHY): Replica failed health check: the engine's step thread has stopped"


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
