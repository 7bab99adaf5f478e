"""OpenAI's ``logit_bias``: validated where it enters (SamplingParams, the router, the engine), added
to the logits after penalties in the one batched sampler (greedy and sampled rows, the C++ kernel's
path and torch's, the logprobs too), and carried by HTTP and gRPC to the engine."""

from __future__ import annotations

import json

import pytest
import torch

from kubeinfer.client import Client
from kubeinfer.local.router import build_local_router
from kubeinfer.serve.config import AppConfig, ModelSpec, RouterSettings
from kubeinfer.worker import Engine, SamplingParams
from kubeinfer.worker.kernels.cpu import load_cpu_kernels
from kubeinfer.worker.sampling import Sampler, SamplingBatch
from tests.test_grpc_server import Server
from tests.test_http_api import MODEL, model_dir, post, server  # noqa: F401 (fixtures)

V = 64


def run(logits, params, sampler=None):
    n = len(params)
    batch = SamplingBatch.build(params, [[] for _ in range(n)], [[] for _ in range(n)], [None] * n, V)
    return (sampler or Sampler())(logits, batch)


def test_validation_and_normalisation():
    assert SamplingParams(logit_bias={"7": 5, 3: -1.5}).logit_bias == {7: 5.0, 3: -1.5}  # JSON's string keys too
    assert SamplingParams(logit_bias={}).logit_bias is None
    for bias, message in [({7: 101}, r"logit_bias\[7\] must be in \[-100, 100\], got 101"),
                          ({7: float("nan")}, r"logit_bias\[7\] must be"),
                          ({-1: 1}, "logit_bias must be keyed by token ids"),
                          ({"x": 1}, "logit_bias must be keyed by token ids"),
                          ([1, 2], "logit_bias must be a map")]:
        with pytest.raises(ValueError, match=message):
            SamplingParams(logit_bias=bias)
    with pytest.raises(ValueError, match=r"logit_bias token ids must be in \[0, 64\)"):
        SamplingBatch.build([SamplingParams(logit_bias={V: 1})], [[]], [[]], [None], V)


def test_bias_moves_only_its_row_greedy_and_sampled():
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(0))
    top = logits.argmax(dim=-1)
    params = [SamplingParams(temperature=0, logit_bias={5: 100}),            # forced
              SamplingParams(temperature=0, logit_bias={int(top[1]): -100}),  # its argmax banned
              SamplingParams(temperature=0)]                                 # untouched
    out = run(logits, params)
    second = logits[1].clone()
    second[top[1]] = -float("inf")
    assert out.token_ids.tolist() == [5, int(second.argmax()), int(top[2])]
    kernels = load_cpu_kernels()
    samplers = [Sampler()] + ([Sampler(kernels.greedy_argmax, sample_rows=kernels.sample_rows)] if kernels else [])
    for sampler in samplers:  # sampled rows, on torch's draw and on the C++ kernel's
        for seed in range(20):
            got = run(logits[:2], [SamplingParams(temperature=1.0, seed=seed, logit_bias={9: 100}),
                               SamplingParams(temperature=1.0, seed=seed, top_k=3, logit_bias={int(top[1]): -100})],
                      sampler).token_ids.tolist()
            assert got[0] == 9 and got[1] != int(top[1])


def test_logprobs_are_of_the_biased_distribution():
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(1))
    out = run(logits, [SamplingParams(temperature=0, logprobs=2, logit_bias={4: 3.0})])
    biased = logits[0].clone()
    biased[4] += 3.0
    want = biased.log_softmax(-1)
    assert int(out.token_ids[0]) == int(biased.argmax())
    assert float(out.logprobs[0]) == pytest.approx(float(want.max()), abs=1e-5)
    assert out.top_logprobs[1][0].tolist() == pytest.approx(want.topk(2).values.tolist(), abs=1e-5)


def test_the_engine_forces_and_bans_tokens(tiny_llama_dir):
    engine = Engine(model=tiny_llama_dir, max_model_len=128, num_kv_blocks=32)
    greedy = dict(temperature=0, max_tokens=6, ignore_eos=True)
    plain = engine.generate(["hello world"], SamplingParams(**greedy))[0].output_token_ids
    forced = engine.generate(["hello world"], SamplingParams(**greedy, logit_bias={11: 100}))[0].output_token_ids
    assert forced == [11] * 6
    banned = engine.generate(["hello world"], SamplingParams(**greedy, logit_bias={plain[0]: -100}))[0].output_token_ids
    assert banned[0] != plain[0]
    vocab = engine.model_config.vocab_size
    with pytest.raises(ValueError, match=rf"logit_bias token ids must be in \[0, {vocab}\)"):
        engine.add_request("bad", prompt="hi", params=SamplingParams(logit_bias={vocab: 1}))
    assert not engine.has_unfinished_requests()


def test_http_logit_bias_forces_a_token(server):
    token = server.router.models[MODEL].tokenizer.encode("fox")[-1]
    out = server.client.completions.create(model=MODEL, prompt="The quick brown", max_tokens=4, temperature=0,
                                           logit_bias={str(token): 100}, logprobs=0,
                                           extra_body={"ignore_eos": True})
    tokenizer = server.router.models[MODEL].tokenizer
    assert out.choices[0].logprobs.tokens == [tokenizer.decode([token])] * 4


@pytest.mark.parametrize("bias, message", [
    ({"abc": 1}, "logit_bias keys must be token ids (decimal integers), got 'abc'"),
    ({"1000000": 1}, "logit_bias's token ids must be integers in [0, "),
    ({"5": 200}, "logit_bias[5] must be in [-100, 100], got 200"),
])
def test_http_bad_logit_bias_is_a_400(server, bias, message):
    for path, body in (("completions", {"prompt": "hi"}), ("chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
        status, _, out = post(f"{server.url}/v1/{path}", json.dumps(
            {"model": MODEL, "max_tokens": 2, "logit_bias": bias, **body}).encode())
        assert status == 400 and message in out["error"]["message"], out


def test_grpc_logit_bias(tiny_llama_dir):
    spec = ModelSpec(name=MODEL, uri=tiny_llama_dir, max_model_len=128, engine={"num_kv_blocks": 32}, num_replicas=1)
    server = Server(build_local_router(AppConfig(models=[spec], router=RouterSettings())))
    try:
        with Client(f"127.0.0.1:{server.port}") as client:
            out = client.generate("hello", max_tokens=3, temperature=0, ignore_eos=True, logit_bias={12: 100})
            assert out.token_ids == [12, 12, 12]
    finally:
        server.close()


def test_speculative_decoding_verifies_with_the_bias(tiny_llama_dir):
    """The target's verification samples with the bias: a forced token's n-gram drafts are all
    accepted, and a banned token never appears, exactly as without speculation."""
    from tests.test_speculative import NGRAM
    kw = dict(model=tiny_llama_dir, max_model_len=256, num_kv_blocks=64)
    spec, plain = Engine(**kw, **NGRAM), Engine(**kw)
    forced = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logit_bias={11: 100})
    assert spec.generate(["hello world"], forced)[0].output_token_ids == [11] * 12
    stats = spec.stats().speculative
    assert stats.num_accepted_tokens > 0
    first = plain.generate(["hello world"], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    banned = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                            logit_bias={t: -100 for t in set(first.output_token_ids[:3])})
    want = plain.generate(["hello world"], banned)[0].output_token_ids
    assert spec.generate(["hello world"], banned)[0].output_token_ids == want
    assert not set(want) & set(banned.logit_bias)
