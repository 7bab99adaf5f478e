"""The operator in Serve-API mode against a real local Ray: kopf (watching kmock) deploys the real
application with a tiny model through Ray's Serve REST API, the ModelDeployment becomes Ready, its
reported endpoint streams text over gRPC, and deleting the ModelDeployment removes the application.

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
    CRD_PATH, MD, RAYSERVICE_CRD_PATH, cluster, condition, eventually, get, model_deployment, phase,
    running_operator, url)

pytestmark = [
    pytest.mark.asyncio,
    pytest.mark.skipif(not CRD_PATH.exists() or not RAYSERVICE_CRD_PATH.exists(), reason="a CRD is missing"),
]
NAME = "tiny-e2e"


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
