"""Speculative decoding (n-gram prompt lookup): exact at temperature 0, the target's distribution
when sampling, KV blocks all returned, stops and limits cut where plain decoding cuts."""

from __future__ import annotations

import collections

import pytest

from kubeinfer.worker import Engine, SamplingParams
from kubeinfer.worker.config import EngineConfig
from kubeinfer.worker.speculative import SpeculativeStats, accept, ngram_proposal
from tests.conftest import TINY_VOCAB

# Repetitive prompts, so the lookup finds matches (a random tiny model also loops when greedy).
PROMPTS = [[5, 17, 99, 3, 5, 17, 99, 3, 5, 17],
           list(range(10, 40)) * 2,
           [(i * 37 + 11) % TINY_VOCAB for i in range(60)],
           [7, 8, 9] * 12]
NGRAM = dict(speculative_method="ngram", num_speculative_tokens=4, prompt_lookup_min=1, prompt_lookup_max=3)


class OracleProposer:
    """Proposes the plain-greedy continuation (known from a first run), with every third proposal
    wrong at one position: a random tiny model rarely repeats itself, so n-gram lookup alone would
    leave the accept path, the bonus token and rollback mostly unexercised."""

    def __init__(self, continuations: dict[tuple[int, ...], list[int]]) -> None:
        self.continuations = continuations
        self.calls = 0

    def __call__(self, token_ids: list[int], k: int, n_min: int, n_max: int) -> list[int]:
        for prompt, rest in self.continuations.items():
            if tuple(token_ids[:len(prompt)]) == prompt:
                done = len(token_ids) - len(prompt)
                drafts = list(rest[done:done + k])
                self.calls += 1
                if drafts and self.calls % 3 == 0:
                    i = self.calls % len(drafts)
                    drafts[i] = (drafts[i] + 1) % TINY_VOCAB
                return drafts
        return []


@pytest.fixture
def oracle(monkeypatch):
    def install(prompts, outputs) -> OracleProposer:
        proposer = OracleProposer({tuple(p): o for p, o in zip(prompts, outputs)})
        monkeypatch.setattr("kubeinfer.worker.speculative.ngram_proposal", proposer)
        return proposer
    return install


def engine(path: str, **kw) -> Engine:
    return Engine(model=path, **{"max_model_len": 256, "num_kv_blocks": 64, "max_num_batched_tokens": 64, **kw})


def test_ngram_proposal_and_acceptance_rule():
    assert ngram_proposal([1, 2, 3, 4, 5, 9, 1, 2, 3], 3, 1, 3) == [4, 5, 9]
    assert ngram_proposal([1, 2, 3, 1, 2, 7, 1, 2], 2, 2, 2) == [7, 1]  # the latest match wins
    assert ngram_proposal([1, 2, 3], 3, 1, 3) == []
    assert accept([4, 5, 9], [4, 5, 7, 8]) == [4, 5, 7]  # the first miss ends it, with the target's token
    assert accept([4, 5], [4, 5, 6]) == [4, 5, 6]       # all accepted: plus the bonus token
    stats = SpeculativeStats()
    stats.record(3, 2)
    stats.record(2, 0)
    assert (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens, stats.accepted_per_pos) == \
        (2, 5, 2, [1, 1, 0])


@pytest.mark.parametrize("family,backend", [("llama", "cpp"), ("llama", "torch"), ("qwen2", "cpp")])
def test_greedy_output_is_plain_greedy_alone_and_in_a_batch(tiny_llama_dir, tiny_qwen_dir, oracle, family, backend):
    path = tiny_llama_dir if family == "llama" else tiny_qwen_dir
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    plain = [o.output_token_ids for o in engine(path, kernel_backend=backend).generate(PROMPTS, params)]
    oracle(PROMPTS, plain)
    spec = engine(path, kernel_backend=backend, **NGRAM)
    free = spec.kv.pool.num_free
    for prompt, want in zip(PROMPTS, plain):  # alone
        assert spec.generate([prompt], params)[0].output_token_ids == want
    outs = spec.generate(PROMPTS, params)  # together, with chunked prefill (a 16-token budget below)
    assert [o.output_token_ids for o in outs] == plain
    stats = spec.stats().speculative
    assert stats.num_accepted_tokens > 0 and stats.num_draft_tokens > stats.num_accepted_tokens  # both paths ran
    assert spec.kv.pool.num_free == free
    chunked = engine(path, kernel_backend=backend, max_num_batched_tokens=16, **NGRAM)
    assert [o.output_token_ids for o in chunked.generate(PROMPTS, params)] == plain


def test_preemption_and_plain_requests_sharing_the_steps(tiny_llama_dir, oracle):
    params = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)
    prompts = PROMPTS * 2
    plain = [o.output_token_ids for o in engine(tiny_llama_dir).generate(prompts, params)]
    oracle(prompts, plain)
    # 12 blocks of 16 cannot hold 8 growing requests: some are preempted and recomputed.
    spec = engine(tiny_llama_dir, max_model_len=128, num_kv_blocks=12, block_size=16,
                  speculative_disable_by_batch_size=64, **NGRAM)
    outs = spec.generate(prompts, params)
    assert spec.stats().num_preemptions > 0 and spec.stats().speculative.num_accepted_tokens > 0
    assert [o.output_token_ids for o in outs] == plain
    assert spec.kv.pool.num_free == spec.kv.pool.num_blocks


def test_disable_by_batch_size_turns_it_off(tiny_llama_dir):
    spec = engine(tiny_llama_dir, speculative_disable_by_batch_size=2, **NGRAM)
    spec.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    assert spec.stats().speculative.num_drafts == 0  # four running sequences, more than 2


def test_stops_and_limits_cut_where_plain_decoding_does(tiny_llama_dir, oracle):
    base = engine(tiny_llama_dir)
    spec = engine(tiny_llama_dir, **NGRAM)
    free_runs = [o.output_token_ids for o in base.generate(
        PROMPTS, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))]
    oracle(PROMPTS, free_runs)
    for prompt, ids in zip(PROMPTS, free_runs):
        stop_text = base.tokenizer.decode(ids[5:8])
        for params in (SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True),
                       SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, stop_token_ids=[ids[9]]),
                       SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, stop=[stop_text])):
            want = base.generate([prompt], params)[0]
            got = spec.generate([prompt], params)[0]
            assert (got.output_token_ids, got.text, got.finish_reason) == (want.output_token_ids, want.text,
                                                                           want.finish_reason)
    assert spec.stats().speculative.num_accepted_tokens > 0  # stops fell inside verified runs too


def test_sampling_keeps_the_target_distribution(tiny_llama_dir, oracle):
    """Tokens decided by a verification step (the draft's position and the bonus after it): the
    distribution of each with speculation equals the target's (total variation between the two
    empirical marginals over 800 seeded trials; top-k 2 keeps the bins few, so the bound is tight),
    with drafts that are the greedy continuation (so some are accepted, some not)."""
    prompt = [7, 8, 9] * 12
    greedy = engine(tiny_llama_dir).generate([prompt], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    oracle([prompt], [greedy[0].output_token_ids])
    trials = 800
    params = [SamplingParams(temperature=1.0, top_k=2, max_tokens=3, ignore_eos=True, seed=s) for s in range(trials)]
    plain = engine(tiny_llama_dir, max_num_seqs=64).generate([prompt] * trials, params)
    spec_engine = engine(tiny_llama_dir, max_num_seqs=64, speculative_disable_by_batch_size=64, **NGRAM)
    spec = spec_engine.generate([prompt] * trials, params)
    stats = spec_engine.stats().speculative
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens  # drafts were accepted and rejected
    for pos in (1, 2):
        a = collections.Counter(o.output_token_ids[pos] for o in plain)
        b = collections.Counter(o.output_token_ids[pos] for o in spec)
        tv = 0.5 * sum(abs(a[k] - b[k]) for k in a.keys() | b.keys()) / trials
        assert tv < 0.1, (pos, tv, a, b)


def test_bad_speculative_settings_are_refused():
    for bad, match in ((dict(speculative_method="eagle"), "speculative_method"),
                       (dict(num_speculative_tokens=0), "num_speculative_tokens"),
                       (dict(prompt_lookup_min=3, prompt_lookup_max=2), "prompt_lookup_max")):
        with pytest.raises(ValueError, match=match):
            EngineConfig(**bad)


def test_a_request_whose_drafts_keep_failing_stops_drafting(tiny_llama_dir, monkeypatch):
    """Drafts that are always wrong: the request's acceptance rate falls until no draft pays for its
    verification row, so it drafts in few of its 40 steps, and its output is still plain greedy's.
    The step costs are fixed here (a verification row costs 30% of a one-row step), not measured."""
    from kubeinfer.worker.speculation_budget import StepCosts
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    want = engine(tiny_llama_dir).generate([PROMPTS[0]], params)[0].output_token_ids

    def wrong(token_ids, k, n_min, n_max):  # the token after the right one is never the right one
        return [(want[len(token_ids) - len(PROMPTS[0])] + 1) % TINY_VOCAB] * k
    monkeypatch.setattr("kubeinfer.worker.speculative.ngram_proposal", wrong)
    monkeypatch.setattr(StepCosts, "observe", lambda self, rows, seconds: None)
    spec = engine(tiny_llama_dir, **NGRAM)
    spec.speculator.costs.seconds = {1: 1.0, 2: 1.3}
    assert spec.generate([PROMPTS[0]], params)[0].output_token_ids == want
    stats = spec.stats().speculative
    assert stats.num_accepted_tokens == 0 and 0 < stats.num_drafts <= 10


# ---- the draft-model proposer ---------------------------------------------------------------------

DRAFT = dict(speculative_method="draft", num_speculative_tokens=3)


@pytest.mark.parametrize("quantization", [None, "int4"])
def test_draft_model_greedy_output_is_plain_greedy(tiny_llama_dir, quantization):
    """The target drafting for itself: unquantized nearly every draft is accepted (the rows only
    round differently); at int4 fewer are. The output is plain greedy's either way, across chunked
    prefill (the draft catches up in chunks too) and a batch of plain-length prompts."""
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    plain = [o.output_token_ids for o in engine(tiny_llama_dir).generate(PROMPTS, params)]
    spec = engine(tiny_llama_dir, max_num_batched_tokens=16, speculative_draft_quantization=quantization, **DRAFT)
    free = spec.kv.pool.num_free
    assert [o.output_token_ids for o in spec.generate(PROMPTS, params)] == plain
    stats = spec.stats().speculative
    assert stats.num_drafts > 0 and stats.num_accepted_tokens > 0
    if quantization is None:
        assert stats.num_accepted_tokens >= 0.9 * stats.num_draft_tokens
    assert spec.kv.pool.num_free == free


def test_a_step_whose_draft_caught_up_on_a_prompt_does_not_price_drafting(tiny_llama_dir):
    """The first drafting step of a request also runs the draft over the whole prompt: a prefill, no
    sample of what drafting costs. Priced in, it had made the chosen k look several times too dear
    (and, as the only price of its row count, kept k low for the rest of a run)."""
    spec = engine(tiny_llama_dir, speculative_draft_quantization=None, **DRAFT)
    speculator = spec.speculator
    spec.add_request("r", prompt_token_ids=PROMPTS[2], params=SamplingParams(temperature=0.0, max_tokens=12,
                                                                             ignore_eos=True))
    caught_up = []
    while spec.has_unfinished_requests():
        measured = speculator.costs.steps
        spec.step()
        if spec.stats().speculative.num_drafts:  # a step that drafted has run
            caught_up.append((speculator.draft.caught_up_on_prompt, speculator.costs.steps - measured))
    assert caught_up[0] == (True, 0)  # the prompt's catch-up: not measured
    assert all(flag is False and n == 1 for flag, n in caught_up[1:-1])  # drafting steps: measured
    assert len(caught_up) >= 3


def test_draft_model_through_preemption(tiny_llama_dir):
    params = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)
    prompts = PROMPTS * 2
    plain = [o.output_token_ids for o in engine(tiny_llama_dir).generate(prompts, params)]
    spec = engine(tiny_llama_dir, max_model_len=128, num_kv_blocks=12, block_size=16,
                  speculative_disable_by_batch_size=64, speculative_draft_quantization=None, **DRAFT)
    outs = spec.generate(prompts, params)
    assert spec.stats().num_preemptions > 0 and spec.stats().speculative.num_accepted_tokens > 0
    assert [o.output_token_ids for o in outs] == plain


def test_a_draft_that_cannot_draft_for_the_target_is_refused_at_start(tiny_llama_dir, tmp_path):
    import transformers

    from tests.conftest import tiny_hf_config, write_tokenizer
    for name, change, match in (("vocab", dict(vocab_size=TINY_VOCAB + 8), "vocabulary"),
                                ("short", dict(max_position_embeddings=64), "context")):
        config = tiny_hf_config("llama")
        for k, v in change.items():
            setattr(config, k, v)
        path = str(tmp_path / name)
        transformers.LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
        write_tokenizer(path, config.vocab_size)
        with pytest.raises(ValueError, match=match):
            engine(tiny_llama_dir, speculative_draft_model=path, **DRAFT)
