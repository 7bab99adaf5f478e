"""Prompt logprobs (vLLM's ``prompt_logprobs``, what lm-eval's loglikelihood tasks need): computed
in the prefill pass, equal to transformers' at every position, across chunked prefill, a prefix
the cache already holds, preemption and a batch shared with ordinary requests."""

from __future__ import annotations

import pytest
import torch

from kubeinfer.worker import Engine, SamplingParams
from tests.conftest import TINY_VOCAB, build_tiny_model

PROMPTS = [[5, 17, 99, 3, 250, 7],
           list(range(10, 50)),
           [(i * 37 + 11) % TINY_VOCAB for i in range(97)]]
TOP = 3


def reference(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)


def check(entries, ids: list[int], ref: torch.Tensor, top: int = TOP) -> None:
    assert len(entries) == len(ids) and entries[0] is None
    for p, entry in enumerate(entries[1:]):
        target = ids[p + 1]
        assert abs(entry[target] - ref[p, target].item()) < 1e-3, (p, entry[target], ref[p, target].item())
        best = ref[p].topk(top)
        for t, lp in zip(best.indices.tolist(), best.values.tolist()):
            assert abs(entry[t] - lp) < 1e-3
        assert len(entry) <= top + 1


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp(request.param))
    return path, build_tiny_model(path, request.param)


def scoring(max_tokens: int = 1, top: int = TOP) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, prompt_logprobs=top)


def test_chunked_prefill_and_a_batch_shared_with_plain_requests(model):
    path, hf = model
    # A 16-token budget splits the longer prompts over several steps; plain requests share them.
    engine = Engine(model=path, max_model_len=256, num_kv_blocks=64, max_num_batched_tokens=16)
    free = engine.kv.pool.num_free
    plain = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    outs = engine.generate(PROMPTS + PROMPTS, [scoring(4)] * len(PROMPTS) + [plain] * len(PROMPTS))
    for ids, out in zip(PROMPTS, outs):
        check(out.prompt_logprobs, ids, reference(hf, ids))
    for ids, scored, out in zip(PROMPTS, outs, outs[len(PROMPTS):]):
        assert out.prompt_logprobs is None
        assert scored.output_token_ids == out.output_token_ids[:4]  # scoring changes no sampled token
    assert engine.kv.pool.num_free == free  # every block came back (cached ones count as free)


def test_a_cached_prefix_is_scored_again(model):
    path, hf = model
    engine = Engine(model=path, max_model_len=256, num_kv_blocks=64, max_num_batched_tokens=32)
    ids = PROMPTS[2]
    engine.generate([ids], SamplingParams(temperature=0.0, max_tokens=1))  # the cache now holds its blocks
    plain = engine.generate([ids], SamplingParams(temperature=0.0, max_tokens=1))[0]
    assert plain.num_cached_tokens > 0  # the prefix cache is on and hit
    out = engine.generate([ids], scoring(top=0))[0]
    assert out.num_cached_tokens == 0  # every prompt position ran again, so each has its logprob
    check(out.prompt_logprobs, ids, reference(hf, ids), top=0)
    assert all(len(e) == 1 for e in out.prompt_logprobs[1:])  # top 0: the prompt token's own logprob


def test_preemption_scores_nothing_twice(model):
    path, hf = model
    # 8 blocks of 16 tokens cannot hold four growing requests: some are preempted and recomputed.
    engine = Engine(model=path, max_model_len=128, num_kv_blocks=8, block_size=16, max_num_batched_tokens=16)
    prompts = [PROMPTS[1], PROMPTS[1][::-1], PROMPTS[0] * 5, PROMPTS[1][5:]]
    outs = engine.generate(prompts, scoring(max_tokens=40))
    assert engine.stats().num_preemptions > 0
    for ids, out in zip(prompts, outs):
        check(out.prompt_logprobs, ids, reference(hf, ids))


def test_bad_prompt_logprobs_is_refused():
    for bad in (-1, 21, 1.5, True):
        with pytest.raises(ValueError, match="prompt_logprobs"):
            SamplingParams(prompt_logprobs=bad)
