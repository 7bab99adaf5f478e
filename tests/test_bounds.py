"""Bounds before work (issue 18): oversized bodies and prompts are refused before they are parsed or
tokenized, tokenizing runs off the event loop, max_tokens beyond the context is refused, client
errors get readable 4xx / non-INTERNAL statuses, and a full queue answers 429 / RESOURCE_EXHAUSTED
with a retry hint. Real router, real in-process engines, the real FastAPI app under uvicorn and a
real gRPC server, both on loopback, all on one event loop per test."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kubeinfer.proto import inference_pb2 as pb
from kubeinfer.proto import inference_pb2_grpc as pb_grpc
from kubeinfer.router.grpc_service import RETRY_AFTER_KEY, start_grpc_server
from kubeinfer.router.http_api import build_http_app
from kubeinfer.local.router import build_local_router, shutdown_local_router
from kubeinfer.router.router import MIN_IN_FLIGHT, QUEUE_FACTOR, Router
from kubeinfer.router.served_model import DEFAULT_SEQS_PER_REPLICA, ServedModel
from kubeinfer.router.types import Code, RouterError
from kubeinfer.serve.config import AppConfig, ModelSpec, RouterSettings
from tests.conftest import serving_http

MAX_LEN = 256
BIG = "hello " * (10 * (1 << 20) // 6)  # 10 MB
NORMAL = {"prompt": "The quick brown fox", "max_tokens": 4, "temperature": 0.0, "ignore_eos": True}


def make_router(path: str, **settings):
    spec = ModelSpec(name="tiny", uri=path, max_model_len=MAX_LEN, engine={"num_kv_blocks": 64}, num_replicas=1)
    return build_local_router(AppConfig(models=[spec], router=RouterSettings(**settings)))


@dataclass
class Resp:
    status_code: int
    headers: Any
    text: str

    def json(self) -> Any:
        return json.loads(self.text)


class HTTP:
    """A small client of the loopback HTTP server: each call returns the whole response."""

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session, self.url = session, url

    async def request(self, method: str, path: str, **kwargs) -> Resp:
        async with self.session.request(method, self.url + path, **kwargs) as r:
            return Resp(r.status, r.headers, await r.text())

    async def post(self, path: str, *, content=None, **kwargs) -> Resp:
        return await self.request("POST", path, data=content, **kwargs)

    async def get(self, path: str) -> Resp:
        return await self.request("GET", path)


def run(path: str, body, **settings):
    """Run ``body(router, http, grpc_stub, health_stub, channel)`` on one loop with both surfaces up."""
    router = make_router(path, **settings)

    async def main():
        server, port = await start_grpc_server(router, "127.0.0.1:0")
        try:
            async with serving_http(build_http_app(router)) as base, \
                    aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session, \
                    grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                http = HTTP(session, base)
                return await body(router, http, pb_grpc.InferenceStub(channel), health_pb2_grpc.HealthStub(channel),
                                  channel)
        finally:
            await server.stop(0)
    try:
        return asyncio.run(main())
    finally:
        shutdown_local_router(router)


def assert_error(r: Resp, status: int, *words: str) -> str:
    assert r.status_code == status, r.text
    message = r.json()["error"]["message"]
    for w in words:
        assert w in message, message
    return message


def test_a_10mb_prompt_is_refused_while_health_and_a_normal_request_are_served(tiny_llama_dir):
    async def body(router, http, stub, health, channel):
        data = json.dumps({"prompt": BIG}).encode()

        async def chunked():  # no Content-Length: the limit counts the chunks
            for i in range(0, len(data), 1 << 20):
                yield data[i:i + (1 << 20)]
        big = asyncio.create_task(http.post("/v1/completions", json={"prompt": BIG}))
        big_chunked = asyncio.create_task(http.post("/v1/completions", content=chunked()))
        big_grpc = asyncio.ensure_future(stub.Generate(pb.GenerateRequest(prompt=BIG)))
        ok, alive, serving = await asyncio.gather(
            http.post("/v1/completions", json=NORMAL), http.get("/health"),
            health.Check(health_pb2.HealthCheckRequest(service="kubeinfer.v1.Inference")))
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await big_grpc
        return await big, await big_chunked, e.value, ok, alive, serving, router.max_body_bytes
    big, big_chunked, big_grpc, ok, alive, serving, limit = run(tiny_llama_dir, body)
    assert big_grpc.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_prompt_chars" in big_grpc.details()
    assert serving.status == health_pb2.HealthCheckResponse.SERVING
    assert_error(big, 413, "max_body_bytes", str(limit))
    assert big.json()["error"]["type"] == "invalid_request_error"
    assert_error(big_chunked, 413, "max_body_bytes")
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4
    assert alive.json() == {"status": "ok"}


def test_a_prompt_over_the_character_limit_is_refused_on_both_surfaces(tiny_llama_dir):
    async def body(router, http, stub, health, channel):
        r = await http.post("/v1/completions", json={"prompt": BIG})
        chat = await http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": BIG}]})
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Generate(pb.GenerateRequest(prompt=BIG))
        ok = await stub.Generate(pb.GenerateRequest(prompt="hello", sampling=pb.SamplingParams(max_tokens=2)))
        return r, chat, e.value, ok
    r, chat, err, ok = run(tiny_llama_dir, body, max_body_bytes=64 << 20)
    limit = RouterSettings().prompt_char_limit(MAX_LEN)
    assert_error(r, 400, "max_prompt_chars", str(limit))
    assert_error(chat, 400, "max_prompt_chars")
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_prompt_chars" in err.details()
    assert ok.usage.completion_tokens == 2


def test_tokenizing_runs_off_the_event_loop(tiny_llama_dir):
    """With the limits lifted, a 1 MB prompt takes a while to tokenize: health and a normal request
    are answered before it is done (on the event loop they would wait for it)."""
    async def body(router, http, stub, health, channel):
        big = asyncio.create_task(router.aprepare(prompt=BIG[:1 << 20]))
        await asyncio.sleep(0)  # the big one starts first
        alive = await http.get("/health")
        ok = await http.post("/v1/completions", json=NORMAL)
        done_before = big.done()
        with pytest.raises(RouterError) as e:
            await big
        return alive, ok, done_before, e.value
    alive, ok, done_before, err = run(tiny_llama_dir, body, max_prompt_chars=1 << 30, max_body_bytes=1 << 30)
    assert alive.status_code == 200 and ok.status_code == 200
    assert not done_before
    assert err.code == Code.INVALID_ARGUMENT and "context of 256 tokens" in err.message


def test_max_tokens_beyond_the_context_is_refused_naming_the_limit(tiny_llama_dir):
    ids = [5] * (MAX_LEN - 6)

    async def body(router, http, stub, health, channel):
        out = [await http.post("/v1/completions", json={**NORMAL, "max_tokens": n}) for n in (10**9, 2**70)]
        out.append(await http.post("/v1/completions", json={"prompt": ids, "max_tokens": 100}))
        fill = await http.post("/v1/completions", json={"prompt": ids, "ignore_eos": True})
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Generate(pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(max_tokens=2**32 - 1)))
        return out, fill, e.value
    refused, fill, err = run(tiny_llama_dir, body)
    for r in refused:
        assert_error(r, 400, "max_tokens may be at most")
    assert "at most 6" in refused[2].json()["error"]["message"]
    # An omitted max_tokens keeps the default (16) capped by the room left: 6 tokens, "length".
    assert fill.status_code == 200 and fill.json()["usage"]["completion_tokens"] == 6
    assert fill.json()["choices"][0]["finish_reason"] == "length"
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_tokens may be at most" in err.details()


def test_bad_values_get_readable_client_errors(tiny_llama_dir):
    async def body(router, http, stub, health, channel):
        raw = [b'{"prompt": "a\\ud800b"}', b'{"prompt": "hi", "model": "a\\ud800b"}',
               b'{"prompt": "hi", "stop": ["\\udc00"]}',
               b'{"messages": [{"role": "user", "content": "x\\ud800"}]}']
        out = [await http.post("/v1/chat/completions" if b"messages" in b else "/v1/completions", content=b,
                               headers={"content-type": "application/json"}) for b in raw]
        out += [await http.post("/v1/completions", json={**NORMAL, "seed": 2**64}),
                await http.post("/v1/completions", json={**NORMAL, "stop_token_ids": [4_000_000_000]})]
        garbage = channel.unary_unary("/kubeinfer.v1.Inference/Generate")
        with pytest.raises(grpc.aio.AioRpcError) as e1:
            await garbage(b"\xff\xff\xff\xff\x0f\x01")
        with pytest.raises(grpc.aio.AioRpcError) as e2:
            await health.Check(health_pb2.HealthCheckRequest(service="nope"))
        with pytest.raises(grpc.aio.AioRpcError) as e3:
            await stub.Generate(pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(stop_token_ids=[4_000_000_000])))
        serving = await health.Check(health_pb2.HealthCheckRequest(service="kubeinfer.v1.Inference"))
        ok = await http.post("/v1/completions", json=NORMAL)
        return out, e1.value, e2.value, e3.value, serving, ok
    out, garbage, unknown, stop_ids, serving, ok = run(tiny_llama_dir, body)
    for r in out[:4]:
        assert r.status_code in (400, 404), r.text
        assert "internal" not in r.text.lower()
    assert_error(out[0], 400, "lone surrogate")
    message = assert_error(out[4], 400, "seed")
    assert "Overflow" not in message and "long long" not in message
    assert_error(out[5], 400, "stop_token_ids")
    assert garbage.code() == grpc.StatusCode.INVALID_ARGUMENT and "GenerateRequest" in garbage.details()
    assert unknown.code() == grpc.StatusCode.NOT_FOUND
    assert stop_ids.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert serving.status == health_pb2.HealthCheckResponse.SERVING
    assert ok.status_code == 200


def test_the_queue_is_bounded_by_default_from_the_replicas_capacity(tiny_llama_dir):
    router = make_router(tiny_llama_dir)
    try:
        assert router.admission.max_queued == QUEUE_FACTOR * DEFAULT_SEQS_PER_REPLICA * 1
    finally:
        shutdown_local_router(router)


def test_the_in_flight_bound_is_by_default_the_replicas_capacity_and_never_under_the_floor(tiny_llama_dir):
    """Four replicas at max_num_seqs 256 run 1024 sequences at once: a router that ran no more than a
    fixed 256 would leave three quarters of their batch slots idle while requests wait in its queue."""
    router = make_router(tiny_llama_dir)
    try:  # one replica of the engine's default: the floor, as before
        assert router.admission.max_in_flight == max(MIN_IN_FLIGHT, DEFAULT_SEQS_PER_REPLICA)
        tokenizer = router.models["tiny"].tokenizer
    finally:
        shutdown_local_router(router)

    def bound(capacities: list[int], **settings) -> int:
        models = [ServedModel(f"m{i}", tokenizer, max_model_len=64, vocab_size=100, pool=None, capacity=c)
                  for i, c in enumerate(capacities)]
        return Router(models, RouterSettings(**settings)).admission.max_in_flight

    assert bound([4 * 256]) == 1024
    assert bound([600, 600]) == 1200                       # two models' replicas together
    assert bound([16]) == MIN_IN_FLIGHT
    assert bound([4 * 256], max_in_flight=8) == 8          # a value set is kept
    with pytest.raises(ValueError, match="max_in_flight"):
        RouterSettings(max_in_flight=0)


def test_a_request_waiting_past_the_queue_bound_gets_429_and_resource_exhausted(tiny_llama_dir):
    async def body(router, http, stub, health, channel):
        held = router.stream(router.prepare(prompt="hold", sampling={"max_tokens": 200, "ignore_eos": True}))
        await anext(held)  # holds the only slot
        try:
            r = await http.post("/v1/completions", json=NORMAL)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.Generate(pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(max_tokens=2)))
            queued_while_waiting = router.admission.queued
        finally:
            await held.aclose()
        ok = await http.post("/v1/completions", json=NORMAL)
        return r, e.value, queued_while_waiting, ok
    r, err, queued, ok = run(tiny_llama_dir, body, max_in_flight=1, max_queued=4, max_queue_wait_s=0.2)
    assert_error(r, 429, "max_queue_wait_s")
    assert int(r.headers["Retry-After"]) >= 1
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_queue_wait_s" in err.details()
    assert float(dict(err.trailing_metadata())[RETRY_AFTER_KEY]) > 0
    assert queued == 0  # the refused requests left the queue
    assert ok.status_code == 200


def test_health_is_not_serving_once_a_model_has_no_live_replica(tiny_llama_dir):
    async def body(router, http, stub, health, channel):
        check = health_pb2.HealthCheckRequest(service="kubeinfer.v1.Inference")
        before = (await http.get("/health"), await health.Check(check))
        for replica in router.models["tiny"].pool.replicas.values():
            await asyncio.to_thread(replica.engine.shutdown)  # the only replica's engine stops
        after = (await http.get("/health"), await health.Check(check),
                 await health.Check(health_pb2.HealthCheckRequest(service="")))
        return before, after
    (http_before, grpc_before), (http_after, grpc_after, overall_after) = run(tiny_llama_dir, body)
    assert http_before.status_code == 200 and grpc_before.status == health_pb2.HealthCheckResponse.SERVING
    assert http_after.status_code == 503 and http_after.json()["models_without_live_replica"] == ["tiny"]
    assert grpc_after.status == overall_after.status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_a_request_expected_to_wait_past_the_queue_bound_is_refused_at_once(tiny_llama_dir):
    """One completion in the rate window (10 s) and one slot: a queued request is expected to wait
    10 s, over a 5 s bound, so it is refused without waiting."""
    async def body(router, http, stub, health, channel):
        first = await http.post("/v1/completions", json=NORMAL)
        held = router.stream(router.prepare(prompt="hold", sampling={"max_tokens": 200, "ignore_eos": True}))
        await anext(held)
        try:
            r = await http.post("/v1/completions", json=NORMAL)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.Generate(pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(max_tokens=2)))
            queued = router.admission.queued
        finally:
            await held.aclose()
        return first, r, e.value, queued
    first, r, err, queued = run(tiny_llama_dir, body, max_in_flight=1, max_queued=4, max_queue_wait_s=5.0)
    assert first.status_code == 200
    assert_error(r, 429, "expected wait", "max_queue_wait_s")
    assert int(r.headers["Retry-After"]) >= 1
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "expected wait" in err.details()
    assert float(dict(err.trailing_metadata())[RETRY_AFTER_KEY]) > 0
    assert queued == 0
