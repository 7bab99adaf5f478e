"""The gRPC service on a real loopback server over the router and in-process engines (no Ray)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kubeinfer.proto import inference_pb2 as pb
from kubeinfer.proto import inference_pb2_grpc as pb_grpc
from kubeinfer.router.grpc_service import RETRY_AFTER_KEY, start_grpc_server
from kubeinfer.local.router import build_local_router, build_served_model, shutdown_local_router
from kubeinfer.local.pool import LocalPool
from kubeinfer.local.replica import EngineReplica
from kubeinfer.router.router import Router
from kubeinfer.router.types import Code, RouterError
from kubeinfer.serve.config import AppConfig, ModelSpec, RouterSettings
from kubeinfer.worker import Engine, SamplingParams

PROMPTS = ["The quick brown fox", "Kubernetes schedules pods", "def f(x):", "héllo wörld",
           "Ray Serve runs replicas", "naïve café", "return x * 2", "emoji 🙂"]
MAX_TOKENS = 10


def spec(path: str, replicas: int = 2) -> ModelSpec:
    return ModelSpec(name="tiny", uri=path, max_model_len=256, engine={"num_kv_blocks": 64}, num_replicas=replicas)


def greedy(max_tokens: int = MAX_TOKENS) -> pb.SamplingParams:
    return pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(tiny_llama_dir):
    engine = Engine(model=tiny_llama_dir, max_model_len=256, num_kv_blocks=64)
    outs = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True))
    return {p: o.output_token_ids for p, o in zip(PROMPTS, outs)}


class Server:
    """A router + gRPC server running on a private event loop thread for one test module."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self.loop = asyncio.new_event_loop()
        self.server, self.port = self.loop.run_until_complete(start_grpc_server(router, "127.0.0.1:0"))
        import threading
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coro_fn):
        """Run ``coro_fn(stub, health_stub)`` on a fresh channel in this thread's own loop."""
        async def main():
            async with grpc.aio.insecure_channel(f"127.0.0.1:{self.port}") as channel:
                return await coro_fn(pb_grpc.InferenceStub(channel), health_pb2_grpc.HealthStub(channel))
        return asyncio.run(main())

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        shutdown_local_router(self.router)


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    s = Server(build_local_router(AppConfig(models=[spec(tiny_llama_dir)])))
    yield s
    s.close()


async def stream_tokens(stub, prompt: str, **kw) -> tuple[list[int], str, pb.Usage]:
    tokens, reason, usage = [], "", None
    async for msg in stub.GenerateStream(pb.GenerateRequest(prompt=prompt, sampling=greedy(), **kw)):
        tokens += msg.token_ids
        if msg.finish_reason:
            reason, usage = msg.finish_reason, msg.usage
    return tokens, reason, usage


def test_concurrent_streams_and_unary_match_the_engine(server, reference):
    async def run(stub, _):
        streams = await asyncio.gather(*(stream_tokens(stub, p) for p in PROMPTS))
        unary = await asyncio.gather(*(stub.Generate(pb.GenerateRequest(prompt=p, sampling=greedy()))
                                       for p in PROMPTS))
        return streams, unary
    streams, unary = server.call(run)
    for p, (tokens, reason, usage), u in zip(PROMPTS, streams, unary):
        assert tokens == reference[p]
        assert list(u.token_ids) == reference[p]
        assert reason == u.finish_reason == "length"
        assert usage.completion_tokens == MAX_TOKENS and usage.prompt_tokens > 0
        assert u.model == "tiny"
    # both replicas took part (power of two over outstanding requests spreads a burst)
    assert len(server.router.models["tiny"].pool.fresh_reports()) == 2


@pytest.mark.parametrize("request_kwargs, code, words", [
    ({"model": "nope", "prompt": "hi"}, grpc.StatusCode.NOT_FOUND, "nope"),
    ({"prompt": "hi", "sampling": pb.SamplingParams(top_p=2.0)}, grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    ({"prompt": "hi", "sampling": pb.SamplingParams(max_tokens=0)}, grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
    ({"prompt": ""}, grpc.StatusCode.INVALID_ARGUMENT, "empty"),
    ({}, grpc.StatusCode.INVALID_ARGUMENT, "exactly one"),
    ({"prompt": "hi " * 400}, grpc.StatusCode.INVALID_ARGUMENT, "context"),
    ({"prompt_token_ids": pb.TokenIds(ids=[1, 99999])}, grpc.StatusCode.INVALID_ARGUMENT, "token ids"),
    ({"chat": pb.ChatMessages(messages=[pb.ChatMessage(role="robot", content="x")])},
     grpc.StatusCode.INVALID_ARGUMENT, "role"),
])
def test_bad_requests_get_a_status_and_the_server_keeps_serving(server, reference, request_kwargs, code, words):
    async def run(stub, _):
        errors = []
        for method in (stub.Generate, lambda r: _drain(stub.GenerateStream(r))):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await method(pb.GenerateRequest(**request_kwargs))
            errors.append(e.value)
        ok = await stub.Generate(pb.GenerateRequest(prompt=PROMPTS[0], sampling=greedy()))
        return errors, ok
    errors, ok = server.call(run)
    for e in errors:
        assert e.code() == code
        assert words in e.details()
    assert list(ok.token_ids) == reference[PROMPTS[0]]


async def _drain(call) -> list:
    return [m async for m in call]


def test_list_models_and_health(server):
    async def run(stub, health):
        return (await stub.ListModels(pb.ListModelsRequest()),
                await health.Check(health_pb2.HealthCheckRequest(service="kubeinfer.v1.Inference")))
    models, status = server.call(run)
    assert [m.id for m in models.models] == ["tiny"]
    assert models.models[0].max_model_len == 256
    assert status.status == health_pb2.HealthCheckResponse.SERVING


def engine_load(router: Router) -> list[tuple[int, int, float]]:
    return [(r.num_requests_running, r.num_requests_waiting, r.kv_cache_usage)
            for r in (rep.report() for rep in router.models["tiny"].pool.replicas.values())]


def wait_idle(router: Router, timeout_s: float = 30.0) -> list:
    import time
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        load = engine_load(router)
        if all(running == 0 and waiting == 0 for running, waiting, _ in load):
            return load
        time.sleep(0.02)
    return engine_load(router)


def test_cancelled_stream_aborts_the_request_and_frees_its_blocks(server):
    async def run(stub, _):
        call = stub.GenerateStream(pb.GenerateRequest(prompt=PROMPTS[1], sampling=greedy(200)))
        got = 0
        async for msg in call:
            got += len(msg.token_ids)
            if got >= 2:
                break
        busy = engine_load(server.router)
        call.cancel()
        return got, busy
    got, busy = server.call(run)
    assert got >= 2
    assert sum(running for running, _, _ in busy) == 1  # it was running when the client left
    idle = wait_idle(server.router)
    assert all(running == 0 and waiting == 0 for running, waiting, _ in idle)
    # Blocks go back to the pool (prefix-cached ones stay reusable but unreferenced).
    assert all(kv == 0.0 for _, _, kv in idle)


def long_spec(path: str) -> ModelSpec:
    """Room for a 1000-token request: 1000 decode steps cannot fit in 0.1 s (the engine loop alone
    costs more per step) however fast the kernels get, while 240 tokens of the tiny model can."""
    return ModelSpec(name="tiny", uri=path, max_model_len=1024, engine={"num_kv_blocks": 80})


def test_client_deadline_aborts_the_request(tiny_llama_dir):
    s = Server(build_local_router(AppConfig(models=[long_spec(tiny_llama_dir)])))
    try:
        async def run(stub, _):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.Generate(pb.GenerateRequest(prompt=PROMPTS[2], sampling=greedy(1000)), timeout=0.1)
            return e.value.code()
        assert s.call(run) == grpc.StatusCode.DEADLINE_EXCEEDED
        assert all(running == 0 for running, _, _ in wait_idle(s.router))
    finally:
        s.close()


def test_router_deadline_is_deadline_exceeded(tiny_llama_dir):
    s = Server(build_local_router(AppConfig(models=[long_spec(tiny_llama_dir)],
                                            router=RouterSettings(request_timeout_s=0.05))))
    try:
        async def run(stub, _):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await _drain(stub.GenerateStream(pb.GenerateRequest(prompt=PROMPTS[3], sampling=greedy(1000))))
            return e.value
        err = s.call(run)
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "deadline" in err.details()
        assert all(running == 0 for running, _, _ in wait_idle(s.router))
    finally:
        s.close()


def test_a_reader_slower_than_the_engine_still_meets_the_deadline(tiny_llama_dir):
    """The deadline holds when the next chunk is already queued: a reader that pauses past it, while
    the engine goes on writing, gets DEADLINE_EXCEEDED at its next read, not the queued chunks."""
    router = build_local_router(AppConfig(models=[long_spec(tiny_llama_dir)]))

    async def main():
        job = router.prepare(prompt=PROMPTS[3], sampling={"max_tokens": 1000, "temperature": 0.0, "ignore_eos": True})
        stream = router.stream(job, timeout_s=0.5)
        first = await anext(stream)
        assert first.token_ids
        await asyncio.sleep(0.7)  # past the deadline; the engine meanwhile queues more chunks
        with pytest.raises(RouterError) as e:
            await anext(stream)
        await stream.aclose()
        return e.value

    try:
        err = asyncio.run(main())
        assert err.code == Code.DEADLINE_EXCEEDED and "deadline" in err.message
        assert all(running == 0 for running, _, _ in wait_idle(router))
    finally:
        shutdown_local_router(router)


def test_overload_is_resource_exhausted_with_a_retry_hint(tiny_llama_dir):
    s = Server(build_local_router(AppConfig(models=[spec(tiny_llama_dir, 1)],
                                            router=RouterSettings(max_in_flight=1, max_queued=0))))
    try:
        async def run(stub, _):
            held = stub.GenerateStream(pb.GenerateRequest(prompt=PROMPTS[0], sampling=greedy(200)))
            await held.read()  # the first message: the request holds the only slot
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.Generate(pb.GenerateRequest(prompt=PROMPTS[1], sampling=greedy()))
            held.cancel()
            return e.value
        err = s.call(run)
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "overloaded" in err.details()
        trailers = dict(err.trailing_metadata())
        assert float(trailers[RETRY_AFTER_KEY]) > 0
        wait_idle(s.router)
        ok = s.call(lambda stub, _: stub.Generate(pb.GenerateRequest(prompt=PROMPTS[1], sampling=greedy())))
        assert ok.usage.completion_tokens == MAX_TOKENS
    finally:
        s.close()


class FailingReplica(EngineReplica):
    """A replica whose calls break before any token, as a crashed worker's would."""

    calls = 0

    async def generate_batch(self, jobs):
        self.calls += 1
        raise ConnectionError("replica process died")
        yield  # an async generator, like the real one


def test_replica_failure_before_first_token_is_retried_elsewhere(tiny_llama_dir, reference):
    served = build_served_model(spec(tiny_llama_dir, 1), "round_robin")
    good = next(iter(served.pool.replicas.values()))
    bad = FailingReplica(good.engine, "broken")
    served.pool = LocalPool([bad, good], served.pool.policy)
    s = Server(Router([served], RouterSettings(policy="round_robin")))
    try:
        async def run(stub, _):
            return await asyncio.gather(*(stream_tokens(stub, p) for p in PROMPTS[:4]))
        results = s.call(run)
        assert [r[0] for r in results] == [reference[p] for p in PROMPTS[:4]]
        metrics = s.router.metrics.render().decode()
        assert bad.calls >= 1  # round robin sent it work, and each such request was retried
        assert f'kubeinfer:router_retries_total{{model_name="tiny"}} {float(bad.calls)}' in metrics
    finally:
        s.close()


class DyingBeforeReportReplica(EngineReplica):
    """A replica whose first ``failures`` calls break before its report names it (a call Serve sent
    to a replica killed before it began): the router cannot exclude it on the retry."""

    def __init__(self, engine, replica_id: str, failures: int) -> None:
        super().__init__(engine, replica_id)
        self.failures, self.calls = failures, 0

    async def generate_batch(self, jobs):
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionError("replica process died")
        async for item in super().generate_batch(jobs):
            yield item


def test_a_job_is_retried_until_it_starts_within_the_retry_budget(tiny_llama_dir, reference):
    """Two failures before the replica is known (so no exclusion helps) still end in the right
    tokens; a replica that always fails ends the request UNAVAILABLE after a bounded number of tries."""
    from kubeinfer.router.router import RETRY_PAUSES_S
    served = build_served_model(spec(tiny_llama_dir, 1), "round_robin")
    good = next(iter(served.pool.replicas.values()))
    flaky = DyingBeforeReportReplica(good.engine, "flaky", failures=2)
    served.pool = LocalPool([flaky], served.pool.policy)
    s = Server(Router([served], RouterSettings(policy="round_robin")))
    try:
        tokens, reason, _ = s.call(lambda stub, _: stream_tokens(stub, PROMPTS[0]))
        assert tokens == reference[PROMPTS[0]] and reason == "length" and flaky.calls == 3

        flaky.failures, flaky.calls = 10**6, 0

        async def fails(stub, _):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stream_tokens(stub, PROMPTS[1])
            return e.value
        err = s.call(fails)
        assert err.code() == grpc.StatusCode.UNAVAILABLE and "died" in err.details()
        assert flaky.calls == len(RETRY_PAUSES_S) + 1
        metrics = s.router.metrics.render().decode()
        assert f'kubeinfer:router_retries_total{{model_name="tiny"}} {float(2 + len(RETRY_PAUSES_S))}' in metrics
    finally:
        s.close()


def test_micro_batching_sends_concurrent_requests_as_one_call(tiny_llama_dir, reference):
    s = Server(build_local_router(AppConfig(models=[spec(tiny_llama_dir, 1)],
                                            router=RouterSettings(batch_window_ms=200, max_batch_size=4))))
    try:
        async def run(stub, _):
            return await asyncio.gather(*(stream_tokens(stub, p) for p in PROMPTS))
        results = s.call(run)
        assert [r[0] for r in results] == [reference[p] for p in PROMPTS]
        metrics = s.router.metrics.render().decode()
        # 8 requests within one window, at most 4 per call: at least one call carried several.
        count = float(metrics.split('kubeinfer:router_batch_size_count{model_name="tiny"} ')[1].split()[0])
        assert count < len(PROMPTS)
    finally:
        s.close()


def test_metrics_use_vllm_names(server):
    server.call(lambda stub, _: stub.Generate(pb.GenerateRequest(prompt=PROMPTS[4], sampling=greedy())))
    text = server.router.metrics.render().decode()
    for name in ("vllm:time_to_first_token_seconds_count", "vllm:inter_token_latency_seconds_count",
                 "vllm:e2e_request_latency_seconds_count", "vllm:prompt_tokens_total",
                 "vllm:generation_tokens_total", "vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:kv_cache_usage_perc", "vllm:num_preemptions_total", "vllm:prefix_cache_hits_total"):
        assert f"{name}" in text, name
    gen = float(text.split('vllm:generation_tokens_total{model_name="tiny"} ')[1].split()[0])
    assert gen >= MAX_TOKENS


def test_requests_are_routed_by_model_name(tiny_llama_dir, tiny_qwen_dir):
    app = AppConfig(models=[spec(tiny_llama_dir, 1),
                            ModelSpec(name="qwen", uri=tiny_qwen_dir, max_model_len=128,
                                      engine={"num_kv_blocks": 32}, num_replicas=1)])
    s = Server(build_local_router(app))
    try:
        qwen = Engine(model=tiny_qwen_dir, max_model_len=128, num_kv_blocks=32)
        expected = qwen.generate([PROMPTS[0]], SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS,
                                                              ignore_eos=True))[0].output_token_ids

        async def run(stub, _):
            by_name = await asyncio.gather(stream_tokens(stub, PROMPTS[0], model="qwen"),
                                           stream_tokens(stub, PROMPTS[0], model="tiny"),
                                           stream_tokens(stub, PROMPTS[0]))  # empty: the first model
            models = await stub.ListModels(pb.ListModelsRequest())
            return by_name, models
        (on_qwen, on_tiny, on_default), models = s.call(run)
        assert on_qwen[0] == expected
        assert on_tiny[0] == on_default[0] != expected
        assert [(m.id, m.max_model_len) for m in models.models] == [("tiny", 256), ("qwen", 128)]
    finally:
        s.close()


def test_drain_finishes_requests_in_flight_and_refuses_new_ones(tiny_llama_dir, reference):
    s = Server(build_local_router(AppConfig(models=[spec(tiny_llama_dir, 1)])))
    try:
        async def run(stub, _):
            in_flight = stub.GenerateStream(pb.GenerateRequest(prompt=PROMPTS[0], sampling=greedy()))
            first = await in_flight.read()
            drained = asyncio.wrap_future(asyncio.run_coroutine_threadsafe(s.router.drain(30.0), s.loop))
            while not s.router.draining:
                await asyncio.sleep(0.001)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Generate(pb.GenerateRequest(prompt=PROMPTS[1], sampling=greedy()))
            rest = []
            while (msg := await in_flight.read()) != grpc.aio.EOF:
                rest.append(msg)
            await drained
            return first, rest, refused.value
        first, rest, refused = s.call(run)
        tokens = list(first.token_ids) + [t for m in rest for t in m.token_ids]
        assert tokens == reference[PROMPTS[0]]
        assert rest[-1].finish_reason == "length"
        assert refused.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in refused.details()
    finally:
        s.close()
