import math

import pytest
import torch

from kubeinfer.worker.sampling import (Sampler, SamplingBatch, SamplingParams, apply_penalties,
                                       apply_top_k_top_p, make_generator)

V = 32


def run(logits, params, prompt_ids=None, output_ids=None, generators=None):
    n = len(params)
    batch = SamplingBatch.build(params, prompt_ids or [[] for _ in range(n)], output_ids or [[] for _ in range(n)],
                                generators if generators is not None else [make_generator(p.seed) for p in params],
                                logits.shape[1])
    return Sampler()(logits, batch)


def random_logits(b, v=V, seed=0):
    return torch.randn(b, v, generator=torch.Generator().manual_seed(seed)) * 3


# ---- validation ----------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("max_tokens", 0), ("max_tokens", 1.5), ("temperature", -0.1), ("temperature", float("nan")),
    ("top_p", 0.0), ("top_p", 1.1), ("top_k", -2), ("top_k", 2.0), ("min_p", -0.1), ("min_p", 1.5),
    ("repetition_penalty", 0.0), ("presence_penalty", 2.5), ("presence_penalty", -2.1),
    ("frequency_penalty", 3.0), ("seed", 1.5), ("stop", [""]), ("stop", ""), ("stop_token_ids", [-1]),
    ("logprobs", -1), ("logprobs", 21), ("priority", 0.5),
])
def test_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_defaults_and_normalisation():
    p = SamplingParams()
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.stop, p.logprobs) == (16, 1.0, 1.0, 0, [], None)
    assert not p.greedy
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(temperature=0).greedy and SamplingParams(top_k=1).greedy
    assert SamplingParams(logprobs=20).logprobs == 20


# ---- greedy and filters --------------------------------------------------------------------

def test_greedy_is_argmax_and_all_greedy_skips_logprobs():
    logits = random_logits(8)
    out = run(logits, [SamplingParams(temperature=0)] * 8)
    assert torch.equal(out.token_ids, logits.argmax(-1))
    assert out.logprobs is None and out.top_logprobs is None


def test_top_k_1_equals_greedy():
    logits = random_logits(8)
    out = run(logits, [SamplingParams(top_k=1, temperature=1.5, seed=i) for i in range(8)])
    assert torch.equal(out.token_ids, logits.argmax(-1))


def test_top_k_samples_only_top_k():
    torch.manual_seed(0)
    logits = random_logits(1).expand(4000, V).contiguous()
    out = run(logits, [SamplingParams(top_k=5, temperature=2.0)] * 4000)
    allowed = set(logits[0].topk(5).indices.tolist())
    seen = set(out.token_ids.tolist())
    assert seen <= allowed and len(seen) == 5


def test_top_p_keeps_only_the_nucleus():
    torch.manual_seed(0)
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(4000, 4).contiguous()
    seen = set(run(logits, [SamplingParams(top_p=0.7)] * 4000).token_ids.tolist())
    assert seen == {0, 1}
    seen = set(run(logits, [SamplingParams(top_p=0.85)] * 4000).token_ids.tolist())
    assert seen == {0, 1, 2}
    # A mixed batch: top-k and top-p together go through the sorted path.
    seen = set(run(logits, [SamplingParams(top_p=0.99, top_k=2)] * 4000).token_ids.tolist())
    assert seen == {0, 1}


def reference_top_k_top_p(logits, ks, ps):
    """Row by row with a full sort: the definition, not the fast path."""
    out = torch.full_like(logits, -math.inf)
    for r, (k, p) in enumerate(zip(ks, ps)):
        values, order = logits[r].sort(descending=True)
        if k > 0:
            values[k:] = -math.inf
        probs = values.softmax(-1)
        keep = (probs.cumsum(-1) - probs < p) if p < 1 else torch.ones_like(probs, dtype=torch.bool)
        keep &= values > -math.inf
        out[r, order[keep]] = logits[r, order[keep]]
    return out


def test_top_k_top_p_matches_a_full_sort():
    # Peaked rows have narrow nuclei (found among the first candidates); flat rows' nuclei span
    # most of the 2000 tokens, which forces the full-vocabulary fallback.
    g = torch.Generator().manual_seed(3)
    scale = torch.tensor([5.0, 5.0, 0.1, 0.1, 5.0, 0.1, 2.0, 0.1])[:, None]
    logits = torch.randn(8, 2000, generator=g) * scale
    ks = [0, 10, 0, 600, 3, 0, 0, 0]
    ps = [0.9, 0.8, 0.5, 0.95, 1.0, 1.0, 0.3, 0.99]
    got = apply_top_k_top_p(logits.clone(), torch.tensor(ks), torch.tensor(ps))
    assert torch.equal(got, reference_top_k_top_p(logits, ks, ps))
    assert (got[2] > -math.inf).sum() > 256  # the fallback really ran
    got = apply_top_k_top_p(logits[:2].clone(), torch.tensor([0, 7]), None)
    assert torch.equal(got, reference_top_k_top_p(logits[:2], [0, 7], [1.0, 1.0]))


def test_min_p_filter():
    torch.manual_seed(0)
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    logits = probs.log().expand(4000, 4).contiguous()
    assert set(run(logits, [SamplingParams(min_p=0.45)] * 4000).token_ids.tolist()) == {0, 1, 2}
    assert set(run(logits, [SamplingParams(min_p=0.6)] * 4000).token_ids.tolist()) == {0, 1}


def test_temperature_to_zero_is_greedy():
    logits = random_logits(64)
    for t in (1e-4, 1e-30):  # the tiny one would overflow to NaN without a temperature floor
        out = run(logits, [SamplingParams(temperature=t, logprobs=1)] * 64)
        assert torch.equal(out.token_ids, logits.argmax(-1)) and not out.logprobs.isnan().any()


def test_empirical_distribution_matches_softmax():
    torch.manual_seed(1234)
    logits = torch.tensor([[1.0, 0.5, 0.0, -0.5, -1.0, 2.0]])
    n = 20000
    out = run(logits.expand(n, 6).contiguous(), [SamplingParams()] * n)
    freq = torch.bincount(out.token_ids, minlength=6).float() / n
    assert torch.allclose(freq, logits[0].softmax(-1), atol=0.02)


# ---- penalties -----------------------------------------------------------------------------

def test_penalty_formulas():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0, 0.5]])
    seen = torch.tensor([[True, True, False, False, True]])
    out = apply_penalties(logits, seen_mask=seen, repetition_penalty=torch.tensor([2.0]))
    assert torch.allclose(out, torch.tensor([[1.0, -4.0, 1.0, -1.0, 0.25]]))
    counts = torch.tensor([[0.0, 3.0, 1.0, 0.0, 2.0]])
    out = apply_penalties(logits, output_counts=counts, presence_penalty=torch.tensor([0.5]),
                          frequency_penalty=torch.tensor([0.25]))
    assert torch.allclose(out, logits - 0.25 * counts - 0.5 * (counts > 0).float())
    assert torch.equal(logits, torch.tensor([[2.0, -2.0, 1.0, -1.0, 0.5]]))  # input untouched


def test_penalties_through_the_sampler():
    # Token 0 leads; penalising it (seen in the prompt, or repeated in the output) flips the argmax.
    logits = torch.tensor([[3.0, 2.0, 0.0, -1.0]] * 3)
    params = [SamplingParams(temperature=0, repetition_penalty=2.0),
              SamplingParams(temperature=0, frequency_penalty=0.6),
              SamplingParams(temperature=0, presence_penalty=1.5)]
    out = run(logits, params, prompt_ids=[[0], [0], [3]], output_ids=[[], [0, 0], [0]])
    assert out.token_ids.tolist() == [1, 1, 1]
    # Presence/frequency use output tokens only: the prompt's token 0 is not penalised.
    out = run(logits[:1], [SamplingParams(temperature=0, presence_penalty=2.0)], prompt_ids=[[0, 0]],
              output_ids=[[]])
    assert out.token_ids.tolist() == [0]


# ---- seeds ---------------------------------------------------------------------------------

def test_seed_is_reproducible_regardless_of_batch():
    row = random_logits(1, seed=7)
    p = SamplingParams(seed=42)

    def draws(batch_logits, pos, others):
        params = list(others)
        params.insert(pos, p)
        gens = [make_generator(q.seed) for q in params]
        seq = []
        for _ in range(10):
            seq.append(run(batch_logits, params, generators=gens).token_ids[pos].item())
        return seq

    alone = draws(row, 0, [])
    other_logits = random_logits(4, seed=8)
    mixed = torch.cat([other_logits[:2], row, other_logits[2:]])
    others = [SamplingParams(), SamplingParams(temperature=0), SamplingParams(seed=1, top_k=3),
              SamplingParams(top_p=0.5, repetition_penalty=1.3)]
    assert draws(mixed, 2, others) == alone
    assert draws(torch.cat([other_logits, row]), 4, others) == alone
    assert len(set(alone)) > 1  # really sampling, not stuck on the mode
    other_seed = [run(row, [SamplingParams(seed=43)], generators=[g]).token_ids.item()
                  for g in [make_generator(43)] for _ in range(10)]
    assert other_seed != alone


def test_make_generator():
    assert make_generator(None) is None
    a, b = make_generator(5), make_generator(5)
    assert torch.equal(torch.rand(3, generator=a), torch.rand(3, generator=b))


# ---- logprobs and mixed batches --------------------------------------------------------------

def test_logprobs_match_log_softmax():
    logits = random_logits(3)
    params = [SamplingParams(temperature=0, logprobs=2), SamplingParams(temperature=0.7, logprobs=5),
              SamplingParams(temperature=1.0)]
    out = run(logits, params)
    expected = torch.stack([logits[0].log_softmax(-1), (logits[1] / 0.7).log_softmax(-1),
                            logits[2].log_softmax(-1)])
    assert torch.allclose(out.logprobs, expected.gather(1, out.token_ids[:, None]).squeeze(1), atol=1e-5)
    ids, values = out.top_logprobs
    assert ids.shape == values.shape == (3, 5)
    ref_values, ref_ids = expected.topk(5, dim=-1)
    assert torch.equal(ids, ref_ids) and torch.allclose(values, ref_values, atol=1e-5)
    # logprobs=0: only the sampled token's logprob.
    out = run(logits, [SamplingParams(logprobs=0)] * 3)
    assert out.logprobs is not None and out.top_logprobs is None


def test_logprobs_reflect_filtering():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    out = run(logits, [SamplingParams(top_k=2, logprobs=3, seed=0)])
    ids, values = out.top_logprobs
    assert torch.allclose(values[0, :2], logits[0, :2].log_softmax(-1))
    assert values[0, 2] == -math.inf


def test_mixed_batch_in_one_call():
    logits = random_logits(5)
    params = [SamplingParams(temperature=0), SamplingParams(seed=3, top_k=4, logprobs=1),
              SamplingParams(temperature=0, repetition_penalty=1.5, presence_penalty=0.5),
              SamplingParams(top_p=0.9, min_p=0.05, frequency_penalty=0.3), SamplingParams(top_k=1)]
    prompts, outputs = [[1, 2], [3], [4, 5, 6], [], [7]], [[], [8, 8], [9], [10, 10, 11], []]
    before = logits.clone()
    out = run(logits, params, prompts, outputs)
    assert torch.equal(logits, before)  # the sampler works on copies
    assert out.token_ids.shape == (5,) and out.token_ids.dtype == torch.long
    assert out.token_ids[0] == logits[0].argmax() and out.token_ids[4] == logits[4].argmax()
    penalised = apply_penalties(logits[2:3], seen_mask=torch.zeros(1, V, dtype=torch.bool).index_fill_(
        1, torch.tensor([4, 5, 6, 9]), True), repetition_penalty=torch.tensor([1.5]),
        output_counts=torch.zeros(1, V).index_fill_(1, torch.tensor([9]), 1.0),
        presence_penalty=torch.tensor([0.5]), frequency_penalty=torch.tensor([0.0]))
    assert out.token_ids[2] == penalised.argmax()
    assert out.token_ids[1] in logits[1].topk(4).indices
    assert out.top_logprobs[0].shape == (5, 1)
    assert torch.isfinite(out.logprobs).all()


def test_shape_mismatch_is_rejected():
    batch = SamplingBatch.build([SamplingParams()], [[]], [[]], [None], V)
    with pytest.raises(ValueError):
        Sampler()(torch.zeros(1, V + 1), batch)


def test_the_engine_seed_makes_unseeded_sampling_reproducible(tiny_llama_dir):
    """EngineConfig.seed seeds the generator of rows without a seed: two engines with one seed draw
    the same unseeded samples, another seed draws others, and a request's own seed still wins."""
    from kubeinfer.worker import Engine

    params = SamplingParams(temperature=1.0, max_tokens=24, ignore_eos=True)
    def run(seed: int, p: SamplingParams = params) -> list[int]:
        engine = Engine(model=tiny_llama_dir, max_model_len=128, num_kv_blocks=16, seed=seed)
        return engine.generate([[5, 6, 7]], p)[0].output_token_ids

    torch.manual_seed(123)  # the global RNG no longer matters
    a = run(1)
    torch.manual_seed(456)
    assert run(1) == a
    assert run(2) != a
    seeded = SamplingParams(temperature=1.0, max_tokens=24, ignore_eos=True, seed=9)
    assert run(1, seeded) == run(2, seeded)
