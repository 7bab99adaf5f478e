"""The asyncio front streams the same tokens as the engine, and cancellation frees the request."""

from __future__ import annotations

import asyncio

import pytest

from kubeinfer.worker import Engine, SamplingParams
from kubeinfer.worker.async_engine import AsyncEngine

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
PROMPTS = [[5 + i, 17, 99, 3, 250 - i] * (i + 1) for i in range(8)]


@pytest.fixture(scope="module")
def engines(tiny_llama_dir):
    ref = Engine(model=tiny_llama_dir, max_model_len=256, num_kv_blocks=64)
    expected = [o.output_token_ids for o in ref.generate(PROMPTS, GREEDY)]
    front = AsyncEngine(Engine(model=tiny_llama_dir, max_model_len=256, num_kv_blocks=64))
    yield front, expected
    front.shutdown()


async def collect(front: AsyncEngine, ids: list[int], params=GREEDY) -> tuple[list[int], str]:
    tokens, reason = [], None
    async for out in front.generate(prompt_token_ids=ids, params=params):
        tokens += out.new_token_ids
        reason = out.finish_reason
    return tokens, reason


def test_concurrent_streams_match_engine(engines):
    front, expected = engines

    async def main():
        return await asyncio.gather(*(collect(front, p) for p in PROMPTS))

    results = asyncio.run(main())
    assert [r[0] for r in results] == expected
    assert all(r[1] == "length" for r in results)


def test_bad_request_raises_and_others_continue(engines):
    front, expected = engines

    async def main():
        good = asyncio.create_task(collect(front, PROMPTS[0]))
        with pytest.raises(ValueError, match="prompt is empty"):
            await collect(front, [])
        return await good

    assert asyncio.run(main())[0] == expected[0]


def test_cancelled_stream_aborts_request(engines):
    front, _ = engines
    long = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)

    async def main():
        stream = front.generate(prompt_token_ids=PROMPTS[1], params=long)
        first = await stream.__anext__()
        await stream.aclose()          # the client went away
        for _ in range(100):           # the abort is applied by the engine thread between steps
            if not front.engine.has_unfinished_requests():
                break
            await asyncio.sleep(0.02)
        return first

    first = asyncio.run(main())
    assert first.new_token_ids and not first.finished
    assert not front.engine.has_unfinished_requests()
    assert front.engine.kv.usage() == 0.0
