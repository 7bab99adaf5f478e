"""Scale from zero (issue 15 item 3): a request whose call reaches no replica (Serve holds it while a
deployment has no running replica) waits in the router, bounded by ``max_capacity_wait_s`` and by its
own deadline, counted in ``kubeinfer:requests_waiting_for_capacity``; past the bound it gets
UNAVAILABLE / HTTP 503 with a retry hint, and its call is cancelled. End to end: a ``min_replicas: 0``
deployment on the session's local Ray serves its first requests after scaling from zero."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

import pytest

from kubeinfer.router.pool import WorkerPool
from kubeinfer.router.router import CAPACITY_RETRY_AFTER_S, Router
from kubeinfer.router.served_model import ServedModel
from kubeinfer.router.settings import RouterSettings
from kubeinfer.router.types import (Chunk, Code, GenerateJob, ReplicaFailed, ReplicaReport, RouterError,
                                    StreamItem)

WAIT_S = 0.3


class NoCapacityPool(WorkerPool):
    """A pool whose calls reach a replica only after ``place_after_s`` (None: never), as Serve's
    handle holds a call while the deployment has no running replica; records each call's fate."""

    def __init__(self, place_after_s: float | None = None) -> None:
        super().__init__()
        self.place_after_s = place_after_s
        self.calls_started = 0
        self.calls_cancelled = 0
        self.reached_replica = 0

    async def _call(self, jobs: list[GenerateJob], exclude: str | None) -> AsyncIterator[StreamItem]:
        self.calls_started += 1
        try:
            if self.place_after_s is None:
                await asyncio.Event().wait()
            await asyncio.sleep(self.place_after_s)
        except asyncio.CancelledError:
            self.calls_cancelled += 1
            raise
        self.reached_replica += 1
        yield -1, ReplicaReport("r0")
        for i, job in enumerate(jobs):
            yield i, Chunk(job.request_id, text="ok", token_ids=[5], finish_reason="length",
                           prompt_tokens=len(job.prompt_token_ids), completion_tokens=1)
        yield -1, ReplicaReport("r0")

    async def abort(self, replica_id: str, request_id: str) -> None:
        pass


class _Tokenizer:
    eos_token_id = 0

    def encode(self, text: str) -> list[int]:
        return [1 + ord(c) % 90 for c in text] or [1]

    def decode(self, ids, **_) -> str:
        return "".join(chr(32 + i) for i in ids)


def make_router(pool: WorkerPool, **settings) -> Router:
    served = ServedModel("m", _Tokenizer(), max_model_len=64, vocab_size=100, pool=pool, capacity=4)
    return Router([served], RouterSettings(max_capacity_wait_s=WAIT_S, **settings))


def job(i: int = 0) -> GenerateJob:
    return GenerateJob(f"req-{i}", "m", [1, 2, 3], {"max_tokens": 1})


def value(router: Router, metric, model: str = "m") -> float:
    return metric.labels(model)._value.get()


async def collect(router: Router, j: GenerateJob, timeout_s: float | None = None) -> list[Chunk]:
    return [c async for c in router.stream(j, timeout_s=timeout_s)]


def test_a_call_that_reaches_no_replica_gets_unavailable_with_a_retry_hint_and_is_cancelled():
    pool = NoCapacityPool(place_after_s=None)
    router = make_router(pool)

    async def main():
        tasks = [asyncio.create_task(collect(router, job(i))) for i in range(3)]
        await asyncio.sleep(WAIT_S / 3)
        assert value(router, router.metrics.waiting_for_capacity) == 3  # all three wait, counted
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
        await asyncio.sleep(0.05)  # the cancelled calls' clean-up runs
        return results

    results = asyncio.run(main())
    for e in results:
        assert isinstance(e, RouterError) and e.code is Code.UNAVAILABLE, e
        assert e.retry_after_s == CAPACITY_RETRY_AFTER_S and "max_capacity_wait_s" in e.message
    assert value(router, router.metrics.waiting_for_capacity) == 0
    assert value(router, router.metrics.capacity_timeouts) == 3
    assert router.metrics.requests.labels("m", "unavailable")._value.get() == 3
    assert pool.calls_started == 3 and pool.calls_cancelled == 3 and pool.reached_replica == 0
    assert router.admission.in_flight == 0 and router.admission.queued == 0


def test_the_request_deadline_bounds_the_wait_before_the_capacity_bound():
    pool = NoCapacityPool(place_after_s=None)
    router = make_router(pool)
    router.settings.max_capacity_wait_s = 30.0

    async def main():
        with pytest.raises(RouterError) as e:
            await asyncio.wait_for(collect(router, job(), timeout_s=0.2), 20)
        await asyncio.sleep(0.05)
        return e.value

    e = asyncio.run(main())
    assert e.code is Code.DEADLINE_EXCEEDED
    assert value(router, router.metrics.waiting_for_capacity) == 0
    assert value(router, router.metrics.capacity_timeouts) == 0
    assert pool.calls_cancelled == 1


def test_a_replica_that_comes_up_within_the_bound_serves_every_waiting_request():
    pool = NoCapacityPool(place_after_s=0.15)
    router = make_router(pool, batch_window_ms=5.0, max_batch_size=2)
    router.settings.max_capacity_wait_s = 20.0

    async def main():
        tasks = [asyncio.create_task(collect(router, job(i))) for i in range(5)]
        await asyncio.sleep(0.05)
        waiting = value(router, router.metrics.waiting_for_capacity)
        return waiting, await asyncio.wait_for(asyncio.gather(*tasks), 30)

    waiting, results = asyncio.run(main())
    assert waiting == 5
    assert [[c.text for c in r] for r in results] == [["ok"]] * 5
    assert value(router, router.metrics.waiting_for_capacity) == 0
    assert value(router, router.metrics.capacity_timeouts) == 0
    assert pool.reached_replica == pool.calls_started >= 3  # batches of at most 2


class DyingReplicaPool(NoCapacityPool):
    """The first call reaches a replica that dies before any token; the retry's call then waits for a
    replacement that never comes (the deployment's last replica died)."""

    async def _call(self, jobs: list[GenerateJob], exclude: str | None) -> AsyncIterator[StreamItem]:
        if exclude is None and self.calls_started == 0:
            self.calls_started += 1
            yield -1, ReplicaReport("r0")
            raise ReplicaFailed("the replica died", "r0")
        async for item in super()._call(jobs, exclude):
            yield item


def test_a_retry_that_waits_for_a_replacement_replica_is_bounded_too():
    pool = DyingReplicaPool(place_after_s=None)
    router = make_router(pool)
    with pytest.raises(RouterError) as e:
        asyncio.run(asyncio.wait_for(collect(router, job()), 30))
    assert e.value.code is Code.UNAVAILABLE and "max_capacity_wait_s" in e.value.message
    assert router.metrics.retries.labels("m")._value.get() == 1
    assert value(router, router.metrics.capacity_timeouts) == 1
    assert value(router, router.metrics.waiting_for_capacity) == 0
    assert pool.calls_cancelled == 1


def test_capacity_wait_setting_is_validated():
    with pytest.raises(ValueError, match="max_capacity_wait_s"):
        RouterSettings(max_capacity_wait_s=0)


def test_http_and_grpc_answer_503_and_unavailable_with_the_hint():
    import aiohttp
    import grpc

    from kubeinfer.proto import inference_pb2 as pb
    from kubeinfer.proto import inference_pb2_grpc as pb_grpc
    from kubeinfer.router.grpc_service import start_grpc_server
    from kubeinfer.router.http_api import build_http_app
    from kubeinfer.router.types import RETRY_AFTER_KEY, retry_hint_of
    from tests.conftest import serving_http

    router = make_router(NoCapacityPool(place_after_s=None))

    async def main():
        server, port = await start_grpc_server(router, "127.0.0.1:0")
        try:
            answers = []
            async with serving_http(build_http_app(router)) as base, \
                    aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
                for stream in (False, True):
                    async with session.post(f"{base}/v1/completions",
                                            json={"model": "m", "prompt": "hi", "max_tokens": 1,
                                                  "stream": stream}) as r:
                        answers.append((r.status, dict(r.headers), await r.json()))
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.InferenceStub(channel)
                request = pb.GenerateRequest(model="m", prompt="hi", sampling=pb.SamplingParams(max_tokens=1))
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    async for _ in stub.GenerateStream(request, timeout=30):
                        pass
                trailers = dict(e.value.trailing_metadata() or ())
        finally:
            await server.stop(None)
        return answers, e.value, trailers

    answers, err, trailers = asyncio.run(main())
    for status, headers, body in answers:
        assert status == 503, body
        assert headers["Retry-After"] == str(int(CAPACITY_RETRY_AFTER_S))
        assert body["error"]["code"] == "unavailable" and "max_capacity_wait_s" in body["error"]["message"]
    assert err.code() == grpc.StatusCode.UNAVAILABLE and "max_capacity_wait_s" in err.details()
    assert retry_hint_of(err.details()) == CAPACITY_RETRY_AFTER_S
    assert float(trailers[RETRY_AFTER_KEY]) == CAPACITY_RETRY_AFTER_S
    assert value(router, router.metrics.capacity_timeouts) == 3
    assert value(router, router.metrics.waiting_for_capacity) == 0


def test_serve_pool_cancels_a_handle_call_that_never_reached_a_replica():
    """ServePool's calls go through the same bound; a timed-out call's Serve response is cancelled,
    so Serve never starts it later on a new replica with nobody reading."""
    pytest.importorskip("ray.serve")
    from kubeinfer.serve.ingress import ServePool

    class Response:
        cancelled = 0

        def __aiter__(self):
            return self

        async def __anext__(self):
            await asyncio.Event().wait()

        def cancel(self):
            Response.cancelled += 1

    class Method:
        def remote(self, *args, **kwargs):
            return Response()

    class Handle:
        generate_batch = Method()

        def options(self, **_):
            return self

    router = make_router(ServePool(Handle()))
    with pytest.raises(RouterError) as e:
        asyncio.run(asyncio.wait_for(collect(router, job()), 30))
    assert e.value.code is Code.UNAVAILABLE and Response.cancelled == 1
    assert value(router, router.metrics.waiting_for_capacity) == 0


# ---- end to end on the session's local Ray ------------------------------------------------------------

def test_a_zero_replica_deployment_serves_its_first_requests_after_scaling_from_zero(ray_head, tiny_llama_dir):
    """``min_replicas: 0`` under kubeinfer's kvCache policy: the app starts with no Worker replica;
    four concurrent streams wait in the router while Serve starts one, and all complete. Once idle it
    goes back to zero, and the next request scales it up again. No request is lost or timed out."""
    import time
    import urllib.request

    import grpc
    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    from kubeinfer.proto import inference_pb2_grpc as pb_grpc
    from kubeinfer.serve.app import build_app
    from kubeinfer.serve.autoscaling import PolicySettings, ray_policy
    from kubeinfer.serve.config import GRPC_SERVICER_FUNCTIONS, AppConfig, ModelSpec
    from tests.conftest import free_port
    from tests.test_autoscaling import _Stub
    from tests.test_serve_e2e import grpc_stream

    app_name = "kubeinfer-zero"
    ray.init(address=ray_head["address"], log_to_driver=False)
    serve.shutdown()  # one Serve per Ray: another module's app may be running
    http_port, grpc_port = free_port(), free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": http_port},
                grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=list(GRPC_SERVICER_FUNCTIONS)))
    auto = {"min_replicas": 0, "max_replicas": 1, "initial_replicas": 0, "upscale_delay_s": 0.5,
            "downscale_delay_s": 2.0, "downscale_to_zero_delay_s": 2.0, "metrics_interval_s": 0.5,
            "look_back_period_s": 1.0, "policy": ray_policy(PolicySettings(policy="kvCache"))}
    app = AppConfig(models=[ModelSpec(name="tiny", uri=tiny_llama_dir, max_model_len=256,
                                      engine={"num_kv_blocks": 160, "max_num_seqs": 4}, autoscaling=auto)],
                    router=RouterSettings(max_capacity_wait_s=120.0))

    def running() -> int:
        states = serve.status().applications[app_name].deployments["worker-tiny"].replica_states
        return states.get("RUNNING", 0)

    def router_metrics() -> dict[str, float]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{http_port}/zero/metrics", timeout=30).read().decode()
        names = ("kubeinfer:requests_waiting_for_capacity", "kubeinfer:capacity_wait_timeouts_total")
        return {line.split("{")[0]: float(line.split()[-1]) for line in text.splitlines() if line.startswith(names)}

    async def requests(n: int) -> list[dict]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = _Stub(pb_grpc.InferenceStub(channel), (("application", app_name),))
            return await asyncio.gather(*(grpc_stream(stub, f"prompt {i}", max_tokens=16) for i in range(n)))

    def wait_for_zero() -> None:
        deadline = time.monotonic() + 90
        while running() > 0 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert running() == 0, "the idle deployment did not scale to zero"

    try:
        serve.run(build_app(app.to_dict()), name=app_name, route_prefix="/zero")
        assert running() == 0
        first = asyncio.run(requests(4))
        assert [r["error"] for r in first] == [None] * 4 and all(len(r["tokens"]) == 16 for r in first)
        assert running() == 1
        wait_for_zero()
        again = asyncio.run(requests(1))
        assert again[0]["error"] is None and len(again[0]["tokens"]) == 16
        metrics = router_metrics()
        assert metrics["kubeinfer:capacity_wait_timeouts_total"] == 0
        assert metrics["kubeinfer:requests_waiting_for_capacity"] == 0
    finally:
        serve.shutdown()
        ray.shutdown()


def test_serve_flags_set_min_replicas_zero_and_the_capacity_wait():
    from tests.test_autoscaling import _serve_app
    app = _serve_app("--min-replicas", "0", "--max-replicas", "2", "--max-capacity-wait-s", "15")
    assert app.models[0].autoscaling["min_replicas"] == 0 and app.router.max_capacity_wait_s == 15
    assert _serve_app().router.max_capacity_wait_s == 60.0
    with pytest.raises(ValueError, match="max_capacity_wait_s"):
        _serve_app("--max-capacity-wait-s", "0")


def test_through_serve_a_request_past_the_bound_gets_unavailable_and_never_runs_later(ray_head, tiny_llama_dir):
    """A bound shorter than a replica's start (0.3 s): the first tries get UNAVAILABLE with the retry
    hint through Serve's gRPC proxy while the replica starts, a client retrying gets served, and the
    cancelled calls never ran on the replica: its prefix-cache lookups (prompt tokens of the
    requests its engine admitted) are those of the served requests alone."""
    import time
    import urllib.request

    import grpc
    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    from kubeinfer.proto import inference_pb2 as pb
    from kubeinfer.proto import inference_pb2_grpc as pb_grpc
    from kubeinfer.router.types import retry_hint_of
    from kubeinfer.serve.app import build_app
    from kubeinfer.serve.config import GRPC_SERVICER_FUNCTIONS, AppConfig, ModelSpec
    from kubeinfer.worker.models.loader import load_model_info
    from tests.conftest import free_port

    app_name = "kubeinfer-zero-bound"
    ray.init(address=ray_head["address"], log_to_driver=False)
    serve.shutdown()
    http_port, grpc_port = free_port(), free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": http_port},
                grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=list(GRPC_SERVICER_FUNCTIONS)))
    auto = {"min_replicas": 0, "max_replicas": 1, "initial_replicas": 0, "upscale_delay_s": 0.5,
            "downscale_delay_s": 120.0, "downscale_to_zero_delay_s": 120.0, "metrics_interval_s": 0.5,
            "look_back_period_s": 1.0}
    app = AppConfig(models=[ModelSpec(name="tiny", uri=tiny_llama_dir, max_model_len=256,
                                      engine={"num_kv_blocks": 160, "max_num_seqs": 4}, autoscaling=auto)],
                    router=RouterSettings(max_capacity_wait_s=0.3))
    prompt = "prompt 0"
    prompt_tokens = len(load_model_info(tiny_llama_dir)[1].encode(prompt))

    def metrics() -> dict[str, float]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{http_port}/bound/metrics", timeout=30).read().decode()
        names = ("kubeinfer:requests_waiting_for_capacity", "kubeinfer:capacity_wait_timeouts_total",
                 "vllm:prefix_cache_queries_total")
        return {line.split("{")[0]: float(line.split()[-1]) for line in text.splitlines() if line.startswith(names)}

    async def attempt() -> tuple[dict, str]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = pb_grpc.InferenceStub(channel)
            request = pb.GenerateRequest(prompt=prompt, sampling=pb.SamplingParams(
                max_tokens=8, temperature=0.0, ignore_eos=True))
            try:
                tokens = []
                async for msg in stub.GenerateStream(request, timeout=60,
                                                     metadata=(("application", app_name),)):
                    tokens += msg.token_ids
                return {"tokens": tokens, "error": None}, ""
            except grpc.aio.AioRpcError as e:
                return {"tokens": [], "error": e.code()}, e.details()

    try:
        serve.run(build_app(app.to_dict()), name=app_name, route_prefix="/bound")
        refused, served = 0, None
        deadline = time.monotonic() + 90
        while served is None and time.monotonic() < deadline:
            result, details = asyncio.run(attempt())
            if result["error"] is None:
                served = result
                break
            assert result["error"] == grpc.StatusCode.UNAVAILABLE, details
            assert "max_capacity_wait_s" in details and retry_hint_of(details) == 5.0, details
            refused += 1
            time.sleep(0.5)  # sooner than the hint: the test's patience, not a client's
        assert served is not None and len(served["tokens"]) == 8, "never served after scaling from zero"
        assert refused >= 1  # the replica takes longer than 0.3 s to start
        time.sleep(2.0)  # a cancelled call that was going to run late would have started by now
        again, _ = asyncio.run(attempt())
        assert again["error"] is None
        for _ in range(100):  # the pool asks the idle replica for its settled report after each call
            m = metrics()
            if m.get("vllm:prefix_cache_queries_total") == 2 * prompt_tokens:
                break
            time.sleep(0.1)
        assert m["vllm:prefix_cache_queries_total"] == 2 * prompt_tokens, m  # the two served, no orphan
        assert m["kubeinfer:capacity_wait_timeouts_total"] == refused
        assert m["kubeinfer:requests_waiting_for_capacity"] == 0
    finally:
        serve.shutdown()
        ray.shutdown()
