"""Continuous batching: results do not depend on what else runs, with or without prefix caching
or preemption; the prefix cache really skips work."""

from __future__ import annotations

import random

import pytest

from kubeinfer.worker import Engine, SamplingParams
from tests.conftest import TINY_VOCAB

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def make_prompts() -> list[list[int]]:
    rng = random.Random(7)
    shared = [rng.randrange(3, TINY_VOCAB) for _ in range(40)]
    prompts = []
    for i in range(16):
        length = rng.randrange(3, 110)
        own = [rng.randrange(3, TINY_VOCAB) for _ in range(length)]
        prompts.append(shared + own if i % 2 else own)  # half share a 40-token prefix
    return prompts


@pytest.fixture(scope="module")
def alone(tiny_llama_dir) -> list[list[int]]:
    """Each prompt run by itself in an engine with no prefix cache: the reference."""
    engine = Engine(model=tiny_llama_dir, max_model_len=256, num_kv_blocks=64, enable_prefix_caching=False)
    return [engine.generate([p], GREEDY)[0].output_token_ids for p in make_prompts()]


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_batched_equals_alone(tiny_llama_dir, alone, prefix_caching):
    engine = Engine(model=tiny_llama_dir, max_model_len=256, num_kv_blocks=256,
                    enable_prefix_caching=prefix_caching, max_num_batched_tokens=128)
    outs = engine.generate(make_prompts(), GREEDY)
    assert [o.output_token_ids for o in outs] == alone
    stats = engine.stats()
    assert stats.num_preemptions == 0
    assert (stats.prefix_cache_hits > 0) == prefix_caching
    assert engine.kv.usage() == 0.0  # every block went back


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_preemption_keeps_results(tiny_llama_dir, alone, prefix_caching):
    # 16 blocks = 256 slots, while the 16 requests need ~2,000 together: preemption must happen.
    engine = Engine(model=tiny_llama_dir, max_model_len=256, num_kv_blocks=16,
                    enable_prefix_caching=prefix_caching, max_num_batched_tokens=48)
    outs = engine.generate(make_prompts(), GREEDY)
    assert engine.stats().num_preemptions > 0
    assert [o.output_token_ids for o in outs] == alone
    assert all(o.finish_reason == "length" for o in outs)


def test_chunked_prefill_mixes_decodes_and_prefills(tiny_llama_dir, alone):
    engine = Engine(model=tiny_llama_dir, max_model_len=256, num_kv_blocks=256, max_num_batched_tokens=16)
    plans: list[list[int]] = []
    schedule = engine.scheduler.schedule

    def recording_schedule():
        batch = schedule()
        plans.append(list(batch.num_new_tokens))
        return batch

    engine.scheduler.schedule = recording_schedule
    outs = engine.generate(make_prompts(), GREEDY)
    assert [o.output_token_ids for o in outs] == alone
    assert all(sum(plan) <= 16 for plan in plans)
    assert any(1 in plan and any(n > 1 for n in plan) for plan in plans), "no step mixed decodes with a prefill"
    assert max(len(p) for p in make_prompts()) > 16  # so some prompts really were split into chunks


def test_prefix_cache_reuses_blocks(tiny_llama_dir):
    rng = random.Random(3)
    prefix = [rng.randrange(3, TINY_VOCAB) for _ in range(200)]
    tail = [rng.randrange(3, TINY_VOCAB) for _ in range(30)]
    one_token = SamplingParams(temperature=0.0, max_tokens=1)
    engine = Engine(model=tiny_llama_dir, max_model_len=512, num_kv_blocks=64)
    engine.generate([prefix + [11, 12, 13]], one_token)
    before = engine.stats()
    out = engine.generate([prefix + tail], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))[0]
    after = engine.stats()
    # Counted in tokens, once per request: 12 full blocks of 16 shared out of a 230-token prompt.
    assert after.prefix_cache_hits - before.prefix_cache_hits == 192
    assert after.prefix_cache_queries - before.prefix_cache_queries == 230
    assert out.num_cached_tokens == 192
    # Only the 38 uncached prompt tokens ran, then one token per further decode step.
    assert after.computed_tokens - before.computed_tokens == (230 - 192) + 7

    cold = Engine(model=tiny_llama_dir, max_model_len=512, num_kv_blocks=64, enable_prefix_caching=False)
    ref = cold.generate([prefix + tail], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))[0]
    assert out.output_token_ids == ref.output_token_ids
