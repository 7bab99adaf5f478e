"""Cancellation always reaches the engine (issue 18): a request cancelled at any point (before the
engine accepted it, while queued for admission, inside a micro-batch, mid-stream) is aborted there
and its KV blocks are freed.

Each check ends with the exact engine state: no live request, empty scheduler queues, no block
table and the pool's free block count back to its start. Long requests (``max_tokens`` near the
context) make a leaked request still live when checked, so a leak cannot hide by finishing.
"""

from __future__ import annotations

import asyncio
import random
import threading

import grpc
import pytest

from kubeinfer.proto import inference_pb2 as pb
from kubeinfer.proto import inference_pb2_grpc as pb_grpc
from kubeinfer.router.grpc_service import start_grpc_server
from kubeinfer.local.router import build_local_router, shutdown_local_router
from kubeinfer.local.pool import LocalPool
from kubeinfer.router.router import Router
from kubeinfer.router.types import ReplicaFailed
from kubeinfer.serve.config import AppConfig, ModelSpec, RouterSettings
from kubeinfer.worker import Engine, SamplingParams
from kubeinfer.worker.async_engine import AsyncEngine

LONG = dict(temperature=0.0, max_tokens=900, ignore_eos=True)   # never finishes within a test round
SHORT = dict(temperature=0.0, max_tokens=4, ignore_eos=True)    # finishes on its own


def prompt(rng: random.Random) -> list[int]:
    return [rng.randrange(3, 300) for _ in range(rng.randrange(2, 20))]


def engine_state(engine: Engine) -> tuple:
    return (sorted(engine.requests), len(engine.scheduler.waiting), len(engine.scheduler.running),
            len(engine.kv.tables), engine.kv.pool.num_free)


def idle_state(engine: Engine) -> tuple:
    return ([], 0, 0, 0, engine.kv.pool.num_blocks)


async def settle(fronts: list[AsyncEngine], router: Router | None = None) -> None:
    """Wait (bounded) until the router holds nothing and every abort sent reached its engine."""
    for _ in range(2000):
        busy = router is not None and (router.admission.in_flight or router.admission.queued or any(
            m.pool._background for m in router.models.values()))
        if not busy:
            break
        await asyncio.sleep(0.005)
    for front in fronts:
        await front.barrier()  # applies every add and abort queued before it


@pytest.fixture(scope="module")
def front(tiny_llama_dir):
    f = AsyncEngine(Engine(model=tiny_llama_dir, max_model_len=1024, num_kv_blocks=512))
    yield f
    f.shutdown()


# ---- the orphan of issue 18, pinned deterministically by holding the engine thread ------------------

def test_cancel_before_the_engine_accepts_never_adds_the_request(front):
    """The old generate() awaited acceptance outside its try/finally and add() put the request in
    the engine before failing on the cancelled future: the request ran on with nobody reading."""
    async def main():
        gate = threading.Event()
        front._submit(gate.wait)  # the engine thread is busy: the add below waits in its inbox
        task = asyncio.create_task(anext(front.generate(prompt_token_ids=[5, 6, 7],
                                                         params=SamplingParams(**LONG))))
        for _ in range(3):
            await asyncio.sleep(0)  # the task submits its add and waits for acceptance
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        snapshot = []
        front._submit(lambda: snapshot.append(engine_state(front.engine)))  # same inbox pass, no step
        gate.set()
        await front.barrier()
        return snapshot[0]

    assert asyncio.run(main()) == idle_state(front.engine)


def test_cancel_after_add_before_the_caller_resumes_aborts(front):
    async def main():
        gate, added, hold = threading.Event(), threading.Event(), threading.Event()
        front._submit(gate.wait)
        task = asyncio.create_task(anext(front.generate(prompt_token_ids=[5, 6, 7],
                                                         params=SamplingParams(**LONG))))
        for _ in range(3):
            await asyncio.sleep(0)
        front._submit(added.set)    # runs right after the add
        front._submit(hold.wait)    # and keeps the engine from stepping meanwhile
        gate.set()
        added.wait()                # blocking on purpose: the task must not resume before its cancel
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        snapshot = []
        front._submit(lambda: snapshot.append(engine_state(front.engine)))
        hold.set()
        await front.barrier()
        return snapshot[0]

    assert asyncio.run(main()) == idle_state(front.engine)


# ---- the matrix: random cancellation moments, many rounds ----------------------------------------

async def cancel_at_random(rng: random.Random, coros: list) -> None:
    """Run the coroutines; cancel each at a random moment (some never, some before they start)."""
    tasks = [asyncio.create_task(c) for c in coros]
    plan = sorted(((rng.choice([0, 0, 1, 2, 5, 10, 30, 80, None]), t) for t in tasks),
                  key=lambda x: -1 if x[0] is None else x[0])
    turn = 0
    for at, task in plan:
        if at is None:
            continue  # runs to its end (short requests) or is cancelled with the rest below
        while turn < at:
            await asyncio.sleep(0.001 if turn % 7 == 0 else 0)
            turn += 1
        task.cancel()
    await asyncio.sleep(0.01)
    for t in tasks:  # whatever is still running (the long requests) goes now, mid-stream
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def consume(stream) -> None:
    async for _ in stream:
        pass


def test_async_engine_matrix(front):
    rng = random.Random(18)

    async def main():
        for _ in range(40):
            coros = [consume(front.generate(prompt_token_ids=prompt(rng),
                                            params=SamplingParams(**rng.choice([LONG, LONG, SHORT]))))
                     for _ in range(rng.randrange(1, 6))]
            await cancel_at_random(rng, coros)
            await settle([front])
            assert engine_state(front.engine) == idle_state(front.engine)

    asyncio.run(main())


def tiny_spec(path: str) -> ModelSpec:
    return ModelSpec(name="tiny", uri=path, max_model_len=1024, engine={"num_kv_blocks": 256}, num_replicas=2)


@pytest.mark.parametrize("settings", [
    RouterSettings(max_in_flight=3, max_queued=64),                                      # admission queue
    RouterSettings(max_in_flight=6, max_queued=64, batch_window_ms=3, max_batch_size=4),  # micro-batches
], ids=["queued", "batched"])
def test_router_matrix(tiny_llama_dir, settings):
    router = build_local_router(AppConfig(models=[tiny_spec(tiny_llama_dir)], router=settings))
    fronts = [r.engine for r in router.models["tiny"].pool.replicas.values()]
    rng = random.Random(1818)

    async def one(sampling):
        job = router.prepare(prompt_token_ids=prompt(rng), sampling=sampling)
        async for _ in router.stream(job):
            pass

    async def main():
        for _ in range(25):
            await cancel_at_random(rng, [one(rng.choice([LONG, LONG, SHORT])) for _ in range(rng.randrange(1, 9))])
            await settle(fronts, router)
            for f in fronts:
                assert engine_state(f.engine) == idle_state(f.engine)
        await router.aclose()

    try:
        asyncio.run(main())
    finally:
        shutdown_local_router(router)


class FailingFirstPool(LocalPool):
    """A LocalPool whose first try of a call fails as a dying replica's would (after its report,
    before any token), so the router retries on the other replica: cancellations then land during
    the failure, the retry's open and the retried stream."""

    async def _call(self, jobs, exclude):
        if exclude is None:
            replica = self._choose(jobs[0], None)
            yield -1, replica.report()
            await asyncio.sleep(0)
            raise ReplicaFailed("the replica died", replica.replica_id)
        async for item in super()._call(jobs, exclude):
            yield item


def test_router_matrix_during_retries(tiny_llama_dir):
    router = build_local_router(AppConfig(models=[tiny_spec(tiny_llama_dir)],
                                          router=RouterSettings(max_in_flight=8, max_queued=64)))
    local = router.models["tiny"].pool
    router.models["tiny"].pool = FailingFirstPool(list(local.replicas.values()), local.policy)
    fronts = [r.engine for r in local.replicas.values()]
    rng = random.Random(18181)

    async def one(sampling):
        job = router.prepare(prompt_token_ids=prompt(rng), sampling=sampling)
        async for _ in router.stream(job):
            pass

    async def main():
        for _ in range(20):
            await cancel_at_random(rng, [one(rng.choice([LONG, SHORT])) for _ in range(rng.randrange(1, 7))])
            await settle(fronts, router)
            for f in fronts:
                assert engine_state(f.engine) == idle_state(f.engine)
        assert router.metrics.retries.labels("tiny")._value.get() > 0  # the retry path really ran

    try:
        asyncio.run(main())
    finally:
        shutdown_local_router(router)


def test_grpc_matrix(tiny_llama_dir):
    router = build_local_router(AppConfig(models=[tiny_spec(tiny_llama_dir)],
                                          router=RouterSettings(max_in_flight=4, max_queued=64)))
    fronts = [r.engine for r in router.models["tiny"].pool.replicas.values()]
    rng = random.Random(181818)

    async def main():
        server, port = await start_grpc_server(router, "127.0.0.1:0")
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.InferenceStub(channel)

                async def one(sampling):
                    req = pb.GenerateRequest(prompt_token_ids=prompt(rng),
                                             sampling=pb.SamplingParams(**sampling))
                    if rng.random() < 0.3:
                        await stub.Generate(req)
                    else:
                        async for _ in stub.GenerateStream(req):
                            pass

                for _ in range(12):
                    await cancel_at_random(rng, [one(rng.choice([LONG, SHORT])) for _ in range(rng.randrange(1, 7))])
                    await settle(fronts, router)
                    for f in fronts:
                        assert engine_state(f.engine) == idle_state(f.engine)
        finally:
            await server.stop(0)

    try:
        asyncio.run(main())
    finally:
        shutdown_local_router(router)


def test_http_matrix(tiny_llama_dir):
    """Clients of the OpenAI surface (real uvicorn on loopback) that hang up at random moments."""
    import json
    import socket

    import uvicorn

    from kubeinfer.router.http_api import build_http_app

    router = build_local_router(AppConfig(models=[tiny_spec(tiny_llama_dir)],
                                          router=RouterSettings(max_in_flight=4, max_queued=64)))
    fronts = [r.engine for r in router.models["tiny"].pool.replicas.values()]
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(build_http_app(router), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    rng = random.Random(18000)

    async def main():
        for _ in range(400):  # bounded wait for the server to listen
            if server.started:
                break
            await asyncio.sleep(0.01)
        port = sock.getsockname()[1]

        async def one(sampling):
            # A plain HTTP/1.1 client: hanging up is closing the socket, as a browser or curl does.
            body = json.dumps({"model": "tiny", "prompt": rng.choice(["The quick brown fox", "def f(x):"]),
                               "stream": rng.random() < 0.7, "temperature": 0.0,
                               "max_tokens": sampling["max_tokens"], "ignore_eos": True}).encode()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
                await writer.drain()
                while await reader.read(4096):
                    pass
            finally:
                writer.close()

        for _ in range(12):
            await cancel_at_random(rng, [one(rng.choice([LONG, SHORT])) for _ in range(rng.randrange(1, 7))])
            for _ in range(2000):  # bounded: uvicorn has finished every request it read (hung up or not)
                if not server.server_state.tasks:
                    break
                await asyncio.sleep(0.005)
            await settle(fronts, router)
            for f in fronts:
                assert engine_state(f.engine) == idle_state(f.engine)

    try:
        asyncio.run(main())
    finally:
        server.should_exit = True
        thread.join(30)
        shutdown_local_router(router)
