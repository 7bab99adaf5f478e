"""The operator end to end: real kopf and our handlers against kmock's Kubernetes API emulator.

kmock keeps objects in memory and streams watch events, but it does not bump resourceVersion or
generation, apply CRD defaults, collect garbage or support generateName (so only the first Event
object is stored: Events are checked in the request log). Tests bump ``metadata.generation``
themselves, as an API server does on a spec change. kopf computes handler delays from the wall
clock, so the one test that waits for kopf to retry runs in real time (looptime off). looptime runs the operator's timers in
loop time, so waiting budgets are loop seconds, not wall-clock time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import pathlib
import socket
from typing import Any, AsyncIterator, Callable

import pytest
import yaml

kopf = pytest.importorskip("kopf")
kmock_lib = pytest.importorskip("kmock")
aiohttp = pytest.importorskip("aiohttp")
from aiohttp import web  # noqa: E402
from aiohttp.test_utils import TestServer  # noqa: E402

from kubeinfer.operator import handlers  # noqa: E402
from kubeinfer.operator.settings import OperatorConfig  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
CRD_PATH = ROOT / "manifests" / "crd.yaml"
RAYSERVICE_CRD_PATH = ROOT.parent / "shared" / "kuberay" / "ray.io_rayservices.yaml"
MD, RS, SVC = "kubeinfer.io/v1alpha1/modeldeployments", "ray.io/v1/rayservices", "v1/services"
NS = "models"
BUDGET_S = 300.0  # loop seconds to wait for the operator to get somewhere



pytestmark = [
    pytest.mark.asyncio,
    pytest.mark.looptime,
    pytest.mark.skipif(not CRD_PATH.exists(), reason=f"{CRD_PATH} (the ModelDeployment CRD) is missing"),
    pytest.mark.skipif(not RAYSERVICE_CRD_PATH.exists(),
                       reason=f"{RAYSERVICE_CRD_PATH} (KubeRay's RayService CRD, in ../shared) is missing"),
]


def resource_info(crd: dict[str, Any]) -> tuple[str, Any]:
    """kmock's discovery entry for a CRD's served storage version."""
    names, version = crd["spec"]["names"], next(v for v in crd["spec"]["versions"] if v.get("storage"))
    info = kmock_lib.ResourceInfo(
        kind=names["kind"], singular=names.get("singular"), namespaced=crd["spec"]["scope"] == "Namespaced",
        shortnames=set(names.get("shortNames", [])), categories=set(names.get("categories", [])),
        verbs={"get", "list", "watch", "create", "update", "patch", "delete"},
        subresources=set(version.get("subresources") or {}))
    return f"{crd['spec']['group']}/{version['name']}/{names['plural']}", info


@pytest.fixture
def cluster(kmock, tmp_path, monkeypatch):
    """kmock serving the builtin APIs, the ModelDeployment and RayService CRDs, and a kubeconfig
    (read by the operator at login, so no import order matters)."""
    kmock.resources.load_bundled()
    for path in (CRD_PATH, RAYSERVICE_CRD_PATH):
        key, info = resource_info(yaml.safe_load(path.read_text()))
        kmock.resources[key] = info
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": str(kmock.url).rstrip("/")}}],
        "users": [{"name": "test", "user": {"token": "test-token"}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "test", "namespace": NS}}]}))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    return kmock


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.asynccontextmanager
async def running_operator(mode: str = "auto", liveness: str | None = None, retry_delay_s: float = 5.0,
                           serve_http_port: int = 8000, kuberay_dashboard: str | None = None
                           ) -> AsyncIterator[asyncio.Task]:
    """The operator on kmock. ``kuberay_dashboard`` None: it reads no RayService's dashboard (the
    default template names cluster DNS, which does not resolve here)."""
    stop = asyncio.Event()
    memo = kopf.Memo(config=OperatorConfig(mode=mode, retry_delay_s=retry_delay_s, serve_http_port=serve_http_port,
                                           kuberay_dashboard=kuberay_dashboard))
    task = asyncio.create_task(kopf.operator(
        registry=handlers.registry, clusterwide=True, standalone=True, memo=memo, stop_flag=stop,
        liveness_endpoint=liveness))
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=60)


def model_deployment(name: str, uid: str, **spec: Any) -> dict[str, Any]:
    body = {"model": {"uri": "builtin://smollm2-135m"}, "replicas": 2,
            "resources": {"cpu": "2", "memory": "4Gi"}, **spec}
    return {"apiVersion": "kubeinfer.io/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": name, "namespace": NS, "uid": uid, "resourceVersion": "1", "generation": 1},
            "spec": body}


def url(resource: str, name: str | None = None) -> str:
    group_version, plural = resource.rsplit("/", 1)
    prefix = "/api/v1" if group_version == "v1" else f"/apis/{group_version}"
    return f"{prefix}/namespaces/{NS}/{plural}" + (f"/{name}" if name else "")


def get(kmock, resource: str, name: str) -> dict[str, Any] | None:
    """The stored object as plain data, or None when absent or deleted."""
    key = (kmock_lib.resource(resource), NS, name)
    if key not in kmock.objects or kmock.objects[key].deleted:
        return None
    return json.loads(json.dumps(kmock.objects[key].raw, default=dict))


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(c for c in obj["status"]["conditions"] if c["type"] == kind)


def requests(kmock, method: str, resource: str) -> list[Any]:
    return list(kmock[method, kmock_lib.resource(resource)])


def events(kmock, name: str) -> list[dict[str, Any]]:
    """The Events posted about the ModelDeployment ``name`` (from the request log)."""
    return [r.data for r in requests(kmock, "post", "v1/events") if r.data["involvedObject"]["name"] == name]


async def eventually(check: Callable[[], Any], what: str, budget_s: float = BUDGET_S) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + budget_s
    while not check():
        if loop.time() > deadline:
            pytest.fail(f"the operator never got to: {what}")
        await asyncio.sleep(0.5)


def phase(kmock, name: str) -> str | None:
    obj = get(kmock, MD, name)
    return (obj or {}).get("status", {}).get("phase")


async def test_lifecycle_create_ready_update_delete(cluster):
    kmock = cluster
    async with running_operator() as operator:
        await kmock.post(url(MD), json=model_deployment("chat", "uid-chat"))

        # Created: a RayService and a Service, both owned by the CR, and status Deploying.
        await eventually(lambda: get(kmock, RS, "chat") and get(kmock, SVC, "chat")
                         and phase(kmock, "chat") == "Deploying", "RayService + Service, phase Deploying")
        owner = {"apiVersion": "kubeinfer.io/v1alpha1", "kind": "ModelDeployment", "name": "chat",
                 "uid": "uid-chat", "controller": True, "blockOwnerDeletion": True}
        rayservice, service = get(kmock, RS, "chat"), get(kmock, SVC, "chat")
        assert rayservice["metadata"]["ownerReferences"] == [owner]
        assert service["metadata"]["ownerReferences"] == [owner]
        assert rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] == 2
        assert {p["port"] for p in service["spec"]["ports"]} == {9000, 8000}
        md = get(kmock, MD, "chat")
        assert md["status"]["observedGeneration"] == 1
        assert md["status"]["endpoint"] == f"chat.{NS}.svc:9000"
        assert condition(md, "Ready")["status"] == "False"
        assert condition(md, "Progressing")["status"] == "True"
        assert "kubeinfer.io/finalizer" in md["metadata"]["finalizers"]

        # KubeRay reports the application RUNNING and its deployments HEALTHY: the CR becomes Ready.
        await kmock.patch(url(RS, "chat") + "/status", json={"status": {
            "serviceStatus": "Running",
            "conditions": [{"type": "Ready", "status": "True", "reason": "RunningServeApplications"}],
            "activeServiceStatus": {"applicationStatuses": {"chat": {"status": "RUNNING", "serveDeploymentStatuses": {
                "router": {"status": "HEALTHY"}, "worker-smollm2-135m": {"status": "HEALTHY"}}}}}}})
        await eventually(lambda: phase(kmock, "chat") == "Ready", "phase Ready")
        md = get(kmock, MD, "chat")
        assert (md["status"]["replicas"], md["status"]["readyReplicas"]) == (2, 2)
        assert md["status"]["endpoint"] == f"chat.{NS}.svc:9000"
        assert condition(md, "Ready")["status"] == "True"
        assert condition(md, "Ready")["reason"] == "ApplicationRunning"
        assert condition(md, "Progressing")["status"] == "False"
        assert condition(md, "Degraded")["status"] == "False"
        assert any(e["type"] == "Normal" and e["reason"] == "ApplicationRunning" for e in events(kmock, "chat"))

        # A spec edit patches the same RayService in place (no re-creation, no deletion).
        await kmock.patch(url(MD, "chat"), json={"metadata": {"generation": 2}, "spec": {"replicas": 3}})
        await eventually(lambda: get(kmock, RS, "chat")["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
                         ["replicas"] == 3, "the RayService scaled to 3 worker pods")
        assert "num_replicas: 3" in get(kmock, RS, "chat")["spec"]["serveConfigV2"]
        assert len(requests(kmock, "post", RS)) == 1
        assert requests(kmock, "patch", RS)
        assert not requests(kmock, "delete", RS)
        await eventually(lambda: get(kmock, MD, "chat")["status"].get("observedGeneration") == 2,
                         "observedGeneration 2")

        # Deleted: the finalizer removes the RayService and the Service, then the CR goes away.
        await kmock.delete(url(MD, "chat"))
        await eventually(lambda: get(kmock, MD, "chat") is None, "the CR released by its finalizer")
        assert get(kmock, RS, "chat") is None and get(kmock, SVC, "chat") is None
        assert len(requests(kmock, "delete", RS)) == 1 and len(requests(kmock, "delete", SVC)) == 1
        assert not operator.done()


async def test_a_gpu_replica_that_cannot_start_says_why(cluster):
    """KubeRay reports the worker deployment DEPLOY_FAILED with the replica's traceback (its engine
    asked for CUDA where there is none): the CR fails with the exception in its Ready condition and in
    a Warning Event, not in a loop of restarts nobody sees."""
    from tests.test_operator_status import NO_CUDA, REPLICA_FAILED
    kmock = cluster
    async with running_operator() as operator:
        await kmock.post(url(MD), json=model_deployment("gpu", "uid-gpu", resources={
            "cpu": "2", "memory": "4Gi", "gpus": 1, "gpuMemory": "16Gi"}))
        await eventually(lambda: phase(kmock, "gpu") == "Deploying", "phase Deploying")
        assert "device: cuda" in get(kmock, RS, "gpu")["spec"]["serveConfigV2"]
        await kmock.patch(url(RS, "gpu") + "/status", json={"status": {"activeServiceStatus": {
            "applicationStatuses": {"gpu": {
                "status": "DEPLOY_FAILED", "message": "Failed to update the deployments ['worker-smollm2-135m'].",
                "serveDeploymentStatuses": {"router": {"status": "HEALTHY"}, "worker-smollm2-135m": {
                    "status": "DEPLOY_FAILED", "message": REPLICA_FAILED}}}}}}})
        await eventually(lambda: phase(kmock, "gpu") == "Failed", "phase Failed")
        ready = condition(get(kmock, MD, "gpu"), "Ready")
        assert (ready["status"], ready["reason"]) == ("False", "DeployFailed")
        assert f"ValueError: {NO_CUDA}" in ready["message"] and "Traceback" not in ready["message"]
        warnings = [e for e in events(kmock, "gpu") if e["type"] == "Warning" and e["reason"] == "DeployFailed"]
        assert warnings and NO_CUDA in warnings[-1]["message"]
        assert not operator.done()


async def test_invalid_deployments_fail_alone(cluster):
    kmock = cluster
    port = free_port()
    async with running_operator(liveness=f"http://127.0.0.1:{port}/healthz") as operator:
        # Both pass the CRD's schema: an unknown builtin model, and a replica too small for its model.
        await kmock.post(url(MD), json=model_deployment(
            "unknown-model", "uid-1", model={"uri": "builtin://no-such-model"}))
        await kmock.post(url(MD), json=model_deployment(
            "too-small", "uid-2", resources={"cpu": "1", "memory": "512Mi"}))
        await kmock.post(url(MD), json=model_deployment("fine", "uid-3"))

        await eventually(lambda: phase(kmock, "unknown-model") == "Failed" and phase(kmock, "too-small") == "Failed"
                         and phase(kmock, "fine") == "Deploying", "two Failed and one Deploying")
        invalid = condition(get(kmock, MD, "unknown-model"), "Ready")
        assert (invalid["status"], invalid["reason"]) == ("False", "InvalidSpec")
        assert "no builtin model 'no-such-model'" in invalid["message"]
        small = condition(get(kmock, MD, "too-small"), "Ready")
        assert (small["status"], small["reason"]) == ("False", "InsufficientMemory")
        assert small["message"].startswith("needs ")
        assert "but the replica has 0.5 GiB (resources.memory)" in small["message"]

        for name, reason in (("unknown-model", "InvalidSpec"), ("too-small", "InsufficientMemory")):
            assert get(kmock, RS, name) is None and get(kmock, SVC, name) is None
            warnings = [e for e in events(kmock, name) if e["type"] == "Warning" and e["reason"] == reason]
            assert warnings, f"no Warning Event {reason} for {name}"
        assert get(kmock, RS, "fine") is not None and get(kmock, SVC, "fine") is not None

        # A permanent failure is not retried: a long quiet time brings no new attempt (each attempt
        # would post an Event and patch the CR).
        def attempts() -> tuple[int, int]:
            patches = [r for r in requests(kmock, "patch", MD) if r.name == "unknown-model"]
            return len(events(kmock, "unknown-model")), len(patches)
        before = attempts()
        await asyncio.sleep(600)
        assert attempts() == before
        assert phase(kmock, "unknown-model") == "Failed"

        # The operator is still alive and healthy.
        assert not operator.done()
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/healthz") as resp:
                assert resp.status == 200
                assert (await resp.json())["target"] == "kuberay"


class FakeServeApi:
    """Ray's Serve REST API as far as the operator uses it: GET reports applications (with the
    status the test sets), PUT replaces the declarative application list. It also stands in for
    Serve's HTTP proxy, where each application's router serves its autoscaling decisions."""

    def __init__(self) -> None:
        self.apps: dict[str, dict[str, Any]] = {}
        self.app_status: dict[str, str] = {}
        self.puts: list[dict[str, Any]] = []
        self.unavailable_puts = 0  # answer this many PUTs with 503, as a Ray head that is restarting
        self.worker_targets: dict[str, int] = {}  # app -> the worker's target_num_replicas (default 2)
        self.proxy_options: dict[str, dict[str, Any]] = {}  # http_options / grpc_options Serve reports
        self.app = web.Application()
        self.app.router.add_get("/api/serve/applications/", self.get)
        self.app.router.add_put("/api/serve/applications/", self.put)
        self.decisions: dict[str, dict[str, Any]] = {}  # route prefix -> {model: decision}
        self.app.router.add_get("/{namespace}/{name}/kubeinfer/autoscaling", self.get_decisions)
        self.app.router.add_get("/kubeinfer/autoscaling", self.get_decisions)  # an application at "/"

    async def get_decisions(self, request: web.Request) -> web.Response:
        info = request.match_info
        route = f"/{info['namespace']}/{info['name']}" if "name" in info else ""
        if route not in self.decisions:
            raise web.HTTPNotFound()
        return web.json_response({"models": self.decisions[route]})

    async def get(self, request: web.Request) -> web.Response:
        applications = {}
        for name, config in self.apps.items():
            status = self.app_status.get(name, "DEPLOYING")
            running = [{"state": "RUNNING"}] * 2 if status == "RUNNING" else []
            worker = f"worker-{config['args']['models'][0]['name']}" if "args" in config else "worker"
            applications[name] = {"name": name, "status": status, "message": "", "deployed_app_config": config,
                                  "deployments": {
                                      "router": {"status": "HEALTHY", "target_num_replicas": 1,
                                                 "replicas": [{"state": "RUNNING"}]},
                                      worker: {"status": "HEALTHY" if running else "UPDATING",
                                               "target_num_replicas": self.worker_targets.get(name, 2),
                                               "replicas": running}}}
        return web.json_response({"applications": applications, **self.proxy_options})

    async def put(self, request: web.Request) -> web.Response:
        if self.unavailable_puts > 0:
            self.unavailable_puts -= 1
            return web.Response(status=503, text="the Serve controller is restarting")
        body = await request.json()
        self.puts.append(body)
        self.apps = {a["name"]: a for a in body["applications"]}
        return web.Response()


async def test_serve_api_mode_adds_and_removes_one_application(cluster):
    kmock = cluster
    fake = FakeServeApi()
    fake.apps["other"] = {"name": "other", "route_prefix": "/other", "import_path": "other:app"}
    async with TestServer(fake.app, host="127.0.0.1") as server, running_operator() as operator:
        address = f"http://127.0.0.1:{server.port}"
        await kmock.post(url(MD), json=model_deployment("remote", "uid-r", rayAddress=address))

        await eventually(lambda: phase(kmock, "remote") == "Deploying", "phase Deploying")
        app = f"{NS}.remote"  # unique per namespace and name, so deployments share one cluster
        assert [a["name"] for a in fake.puts[-1]["applications"]] == ["other", app]
        assert fake.apps[app]["import_path"] == "kubeinfer.serve.app:build_app"
        assert fake.apps[app]["route_prefix"] == f"/{NS}/remote"
        assert get(kmock, RS, "remote") is None  # rayAddress wins over KubeRay
        assert get(kmock, MD, "remote")["status"]["endpoint"] == "127.0.0.1:9000"

        fake.app_status[app] = "RUNNING"
        await eventually(lambda: phase(kmock, "remote") == "Ready", "phase Ready")
        assert get(kmock, MD, "remote")["status"]["readyReplicas"] == 2

        await kmock.delete(url(MD, "remote"))
        await eventually(lambda: get(kmock, MD, "remote") is None, "the CR released by its finalizer")
        assert list(fake.apps) == ["other"]
        assert fake.apps["other"] == {"name": "other", "route_prefix": "/other", "import_path": "other:app"}
        assert not operator.done()


@pytest.mark.looptime(False)
async def test_an_unavailable_serve_api_is_retried(cluster):
    kmock = cluster
    fake = FakeServeApi()
    fake.unavailable_puts = 2
    async with TestServer(fake.app, host="127.0.0.1") as server, running_operator(retry_delay_s=0.1) as operator:
        await kmock.post(url(MD), json=model_deployment("remote", "uid-r", rayAddress=f"http://127.0.0.1:{server.port}"))

        # Two PUTs meet a 503: Warning Events, and kopf retries until the third lands.
        await eventually(lambda: phase(kmock, "remote") == "Deploying", "phase Deploying", budget_s=60)
        assert fake.unavailable_puts == 0 and len(fake.puts) == 1
        warnings = [e for e in events(kmock, "remote") if e["type"] == "Warning"]
        assert warnings and all(e["reason"] == "TargetUnavailable" and "HTTP 503" in e["message"] for e in warnings)
        assert not operator.done()


async def test_an_autoscaled_deployment_reports_each_scale_change(cluster):
    kmock = cluster
    fake = FakeServeApi()
    server = TestServer(fake.app, host="127.0.0.1")
    async with server, running_operator():  # the HTTP proxy's port comes from Serve, not the default 8000
        # Serve started with proxies of its own: the operator reports and reads where they are.
        fake.proxy_options = {"http_options": {"host": "0.0.0.0", "port": server.port},
                              "grpc_options": {"port": 9555}}
        address = f"http://127.0.0.1:{server.port}"
        body = model_deployment("auto", "uid-a", rayAddress=address,
                                autoscaling={"maxReplicas": 4, "policy": "kvCache"})
        del body["spec"]["replicas"]
        await kmock.post(url(MD), json=body)
        app = f"{NS}.auto"
        await eventually(lambda: app in fake.apps, "the application applied")
        policy = fake.apps[app]["args"]["models"][0]["autoscaling"]["policy"]
        assert policy["policy_kwargs"]["policy"] == "kvCache"
        fake.worker_targets[app] = 1  # initialReplicas defaults to minReplicas
        fake.app_status[app] = "RUNNING"
        await eventually(lambda: phase(kmock, "auto") == "Ready", "phase Ready")
        assert get(kmock, MD, "auto")["status"]["autoscaling"] == {"policy": "kvCache"}
        assert get(kmock, MD, "auto")["status"]["endpoint"] == "127.0.0.1:9555"

        fake.worker_targets[app] = 3  # Serve's autoscaler adds replicas
        await eventually(lambda: (get(kmock, MD, "auto")["status"].get("autoscaling") or {}).get("lastScale")
                         == "1 -> 3", "status.autoscaling.lastScale")
        scaled = [e for e in events(kmock, "auto") if e["reason"] == "Scaled"]
        assert [e["message"] for e in scaled] == ["kvCache: 1 -> 3 replicas (up)"]

        # The policy's decision, as the application's router serves it: the reason reaches the
        # status and the next change's Event.
        model = fake.apps[app]["args"]["models"][0]["name"]
        fake.decisions[f"/{NS}/auto"] = {model: [{"policy": "kvCache", "reason": "kvCache 0.30 vs 0.70", "from": 3,
                                                  "to": 2, "time": 1796601600.0}]}
        fake.worker_targets[app] = 2
        await eventually(lambda: (get(kmock, MD, "auto")["status"].get("autoscaling") or {}).get("lastScale")
                         == "3 -> 2", "status.autoscaling.lastScale")
        auto = get(kmock, MD, "auto")["status"]["autoscaling"]
        assert (auto["lastDecision"], auto["lastDecisionTime"]) == ("kvCache 0.30 vs 0.70: 3 -> 2",
                                                                    "2026-12-07T00:00:00Z")
        scaled = [e["message"] for e in events(kmock, "auto") if e["reason"] == "Scaled"]
        assert scaled[-1] == "kvCache: 3 -> 2 replicas (down): kvCache 0.30 vs 0.70"


async def test_kuberay_mode_reads_the_counts_and_the_reason_from_the_rayservices_cluster(cluster):
    """A RayService's status has no replica counts: with autoscaling, the operator reads them from the
    cluster's Serve REST API (KubeRay's head Service; here a stand-in on loopback) and the policy's
    decision from the router, and keeps the last counts while that API cannot be read."""
    kmock = cluster
    fake = FakeServeApi()
    server = TestServer(fake.app, host="127.0.0.1")
    async with server, running_operator(serve_http_port=server.port,
                                        kuberay_dashboard=f"http://127.0.0.1:{server.port}"
                                        ) as operator:
        body = model_deployment("kr", "uid-kr", autoscaling={"maxReplicas": 4, "policy": "queue"})
        del body["spec"]["replicas"]
        await kmock.post(url(MD), json=body)
        await eventually(lambda: get(kmock, RS, "kr") and phase(kmock, "kr") == "Deploying", "RayService applied")
        model = "smollm2-135m"
        fake.apps["kr"] = {"name": "kr", "args": {"models": [{"name": model}]}}  # what KubeRay deployed
        fake.app_status["kr"], fake.worker_targets["kr"] = "RUNNING", 1
        await kmock.patch(url(RS, "kr") + "/status", json={"status": {
            "serviceStatus": "Running",
            "activeServiceStatus": {"applicationStatuses": {"kr": {"status": "RUNNING", "serveDeploymentStatuses": {
                "router": {"status": "HEALTHY"}, f"worker-{model}": {"status": "HEALTHY"}}}}}}})
        await eventually(lambda: phase(kmock, "kr") == "Ready", "phase Ready")

        fake.decisions[""] = {model: [{"policy": "queue", "reason": "queue 4.00/replica vs 2", "from": 1, "to": 2,
                                       "time": 1796601600.0}]}
        fake.worker_targets["kr"] = 2
        await eventually(lambda: get(kmock, MD, "kr")["status"].get("replicas") == 2, "status.replicas from Serve")
        await eventually(lambda: [e["message"] for e in events(kmock, "kr") if e["reason"] == "Scaled"]
                         == ["queue: 1 -> 2 replicas (up): queue 4.00/replica vs 2"], "a Scaled Event with the reason")
        assert get(kmock, MD, "kr")["status"]["autoscaling"]["lastDecision"] == "queue 4.00/replica vs 2: 1 -> 2"

        # The dashboard unreachable: the status keeps the counts it read, and no scale change is made up.
        await server.close()
        await asyncio.sleep(60)
        md = get(kmock, MD, "kr")
        assert md["status"]["replicas"] == 2 and md["status"]["autoscaling"]["lastScale"] == "1 -> 2"
        assert len([e for e in events(kmock, "kr") if e["reason"] == "Scaled"]) == 1
        assert not operator.done()
