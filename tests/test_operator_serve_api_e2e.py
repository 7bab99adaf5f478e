"""The operator in Serve-API mode against a real local Ray: kopf (watching kmock) deploys the real
application with a tiny model through Ray's Serve REST API, the ModelDeployment becomes Ready, its
reported endpoint streams text over gRPC, and deleting the ModelDeployment removes the application.
Autoscaling (issue 15, surfaces): a load through the endpoint of a ``kvCache``-scaled deployment makes
Serve add a replica, and the ModelDeployment's status and Events say so with the policy's reason,
read from the real router.

No looptime here: Ray takes real seconds, so waiting budgets are real seconds too.
"""

from __future__ import annotations

import asyncio

import pytest

grpc = pytest.importorskip("grpc")
aiohttp = pytest.importorskip("aiohttp")

from kubeinfer.operator.render import serve_api_app_name
from kubeinfer.proto import inference_pb2 as pb  # noqa: E402
from kubeinfer.proto import inference_pb2_grpc as pb_grpc  # noqa: E402
from tests.test_operator_kmock import (  # noqa: E402,F401  (cluster is a fixture)
    CRD_PATH, MD, RAYSERVICE_CRD_PATH, cluster, condition, eventually, events, get, model_deployment, phase,
    running_operator, url)

pytestmark = [
    pytest.mark.asyncio,
    pytest.mark.skipif(not CRD_PATH.exists() or not RAYSERVICE_CRD_PATH.exists(), reason="a CRD is missing"),
]
NAME = "tiny-e2e"
AUTO_NAME = "tiny-auto"


async def serve_applications(dashboard: str) -> dict:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{dashboard}/api/serve/applications/") as resp:
            resp.raise_for_status()
            return (await resp.json()).get("applications") or {}


async def test_serve_api_mode_deploys_streams_and_removes(cluster, ray_head, tiny_llama_dir):
    kmock = cluster
    dashboard = ray_head["dashboard"]
    cr = model_deployment(
        NAME, "uid-e2e", rayAddress=dashboard, replicas=1, resources={"cpu": "1", "memory": "1Gi"},
        model={"uri": f"file://{tiny_llama_dir}", "maxModelLen": 256},
        engine={"kvCacheMemory": "64Mi", "maxNumSeqs": 4})
    async with running_operator(mode="serve-api") as operator:
        await kmock.post(url(MD), json=cr)
        await eventually(lambda: phase(kmock, NAME) in ("Ready", "Failed", "Degraded"),
                         "a settled phase", budget_s=420)
        md = get(kmock, MD, NAME)
        assert md["status"]["phase"] == "Ready", md["status"]
        assert (md["status"]["replicas"], md["status"]["readyReplicas"]) == (1, 1)
        assert condition(md, "Ready")["status"] == "True"
        app = serve_api_app_name(md["metadata"]["namespace"], NAME)
        assert (await serve_applications(dashboard))[app]["status"] == "RUNNING"

        # The reported endpoint is Serve's gRPC proxy: a streamed request gets text back.
        endpoint = md["status"]["endpoint"]
        request = pb.GenerateRequest(prompt="The quick brown fox", sampling=pb.SamplingParams(
            max_tokens=8, temperature=0.0, ignore_eos=True))
        async with grpc.aio.insecure_channel(endpoint) as channel:
            chunks = [msg async for msg in pb_grpc.InferenceStub(channel).GenerateStream(
                request, metadata=(("application", app),), timeout=300)]  # a loaded 2-core CI box
        assert len(chunks) >= 2
        assert sum(len(c.token_ids) for c in chunks) == 8
        assert "".join(c.text for c in chunks)

        await kmock.delete(url(MD, NAME))
        await eventually(lambda: get(kmock, MD, NAME) is None, "the CR released by its finalizer", budget_s=120)
        # Serve deletes asynchronously: the application is on its way out, then gone.
        assert (await serve_applications(dashboard)).get(app, {"status": "DELETING"})["status"] == "DELETING"
        for _ in range(120):
            if app not in await serve_applications(dashboard):
                break
            await asyncio.sleep(1)
        assert app not in await serve_applications(dashboard)
        assert not operator.done()


async def _load(endpoint: str, app: str, stop: asyncio.Event) -> list[int]:
    """Rounds of 8 concurrent streams (the engine holds 2 at once) until ``stop``; tokens per stream."""
    request = pb.GenerateRequest(prompt="The quick brown fox", sampling=pb.SamplingParams(
        max_tokens=48, temperature=0.0, ignore_eos=True))
    done: list[int] = []
    async with grpc.aio.insecure_channel(endpoint) as channel:
        stub = pb_grpc.InferenceStub(channel)

        async def one() -> int:
            chunks = [c async for c in stub.GenerateStream(request, metadata=(("application", app),), timeout=300)]
            return sum(len(c.token_ids) for c in chunks)
        while not stop.is_set():
            done += await asyncio.gather(*(one() for _ in range(8)))
    return done


async def test_a_kv_cache_scaled_deployment_reports_its_scale_up_with_the_reason(cluster, ray_head, tiny_llama_dir):
    kmock = cluster
    cr = model_deployment(
        AUTO_NAME, "uid-auto", rayAddress=ray_head["dashboard"], resources={"cpu": "500m", "memory": "1Gi"},
        model={"uri": f"file://{tiny_llama_dir}", "maxModelLen": 256},
        engine={"kvCacheMemory": "64Mi", "maxNumSeqs": 2},
        autoscaling={"minReplicas": 1, "maxReplicas": 2, "policy": "kvCache", "upscaleDelaySeconds": 1,
                     "downscaleDelaySeconds": 600})
    del cr["spec"]["replicas"]
    async with running_operator(mode="serve-api") as operator:
        await kmock.post(url(MD), json=cr)
        await eventually(lambda: phase(kmock, AUTO_NAME) in ("Ready", "Failed", "Degraded"), "a settled phase",
                         budget_s=420)
        md = get(kmock, MD, AUTO_NAME)
        assert md["status"]["phase"] == "Ready", md["status"]
        assert md["status"]["autoscaling"] == {"policy": "kvCache"} and md["status"]["replicas"] == 1

        stop = asyncio.Event()
        app = serve_api_app_name(md["metadata"]["namespace"], AUTO_NAME)
        load = asyncio.create_task(_load(md["status"]["endpoint"], app, stop))
        try:
            await eventually(lambda: ((get(kmock, MD, AUTO_NAME)["status"].get("autoscaling") or {})
                                      .get("lastScale")) == "1 -> 2" or load.done(), "a scale-up", budget_s=300)
        finally:
            stop.set()
        tokens = await asyncio.wait_for(load, timeout=300)
        assert tokens and all(t == 48 for t in tokens)  # no request lost or cut short meanwhile
        # The decision is published before Serve acts on it and kept among the recent ones, so the
        # Event of the change carries its reason even when the policy has changed its mind since.
        def scaled() -> list[str]:
            return [e["message"] for e in events(kmock, AUTO_NAME) if e["reason"] == "Scaled"]
        await eventually(scaled, "a Scaled Event (kopf posts them in the background)", budget_s=60)
        assert scaled()[0].startswith("kvCache: 1 -> 2 replicas (up): kvCache "), scaled()
        # The status shows the policy's newest decision: by now, with the load gone, it may be the
        # scale-down that Serve's 600 s downscale delay holds back.
        assert get(kmock, MD, AUTO_NAME)["status"]["autoscaling"]["lastDecision"].startswith("kvCache "), \
            get(kmock, MD, AUTO_NAME)["status"]

        await kmock.delete(url(MD, AUTO_NAME))
        await eventually(lambda: get(kmock, MD, AUTO_NAME) is None, "the CR released by its finalizer", budget_s=120)
        # Gone from Serve before the next test wants the cluster's CPUs.
        for _ in range(180):
            if app not in await serve_applications(ray_head["dashboard"]):
                break
            await asyncio.sleep(1)
        assert app not in await serve_applications(ray_head["dashboard"])
        assert not operator.done()
