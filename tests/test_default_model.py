"""The default model (SmolLM2-135M-Instruct, bundled GGUF): greedy tokens equal transformers' on the
same dequantized fp32 weights."""

from __future__ import annotations

import pytest
import torch

from kubeinfer.worker import Engine, SamplingParams
from kubeinfer.worker.models.gguf import (default_model_path, iter_gguf_tensors, open_gguf, read_gguf_config,
                                          read_gguf_tokenizer)
from kubeinfer.worker.models.loader import build_model
from tests.conftest import requires_default_model

pytestmark = requires_default_model

PROMPTS = ["The capital of France is",
           "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
           "<|im_start|>user\nName three primary colors.<|im_end|>\n<|im_start|>assistant\n"]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def models():
    transformers = pytest.importorskip("transformers")
    reader = open_gguf(default_model_path())  # parsed once, shared by both sides
    config = read_gguf_config(reader)
    tokenizer = read_gguf_tokenizer(reader)
    ours = build_model(config, iter_gguf_tensors(reader, config, torch.float32), tokenizer, torch.float32, 2048)
    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, rms_norm_eps=config.rms_norm_eps, rope_theta=config.rope_theta,
        max_position_embeddings=config.max_position_embeddings, tie_word_embeddings=config.tie_word_embeddings)
    hf = transformers.LlamaForCausalLM(hf_config).float().eval()
    state = dict(iter_gguf_tensors(reader, config, torch.float32))
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    hf.load_state_dict(state, strict=True)
    return Engine(loaded=ours, max_model_len=2048, num_kv_blocks=128), hf


def test_greedy_matches_transformers(models):
    engine, hf = models
    prompt_ids = [engine.tokenizer.encode(p) for p in PROMPTS]
    outs = engine.generate(prompt_ids, SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True))
    for ids, out in zip(prompt_ids, outs):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                              do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
        assert out.output_token_ids == ref


def test_prefill_logits_match(models):
    engine, hf = models
    from kubeinfer.worker.evaluation import prompt_logits as prefill_logits
    ids = engine.tokenizer.encode(PROMPTS[1])
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(prefill_logits(engine, ids), ref, atol=1e-4, rtol=0)


def test_answers_sensibly(models):
    engine, _ = models
    out = engine.generate(["The capital of France is"], SamplingParams(temperature=0.0, max_tokens=8))[0]
    assert "Paris" in out.text


def test_prompt_logprobs_match_transformers(models):
    """The lm-eval scoring path on the default model: the engine's prompt logprobs (computed in
    the prefill pass) equal log_softmax of transformers' logits at every prompt position."""
    engine, hf = models
    ids = engine.tokenizer.encode(PROMPTS[1])
    out = engine.generate([ids], SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=2))[0]
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    for p, entry in enumerate(out.prompt_logprobs[1:]):
        assert abs(entry[ids[p + 1]] - ref[p, ids[p + 1]].item()) < 1e-3
        top = ref[p].topk(2)
        for t, lp in zip(top.indices.tolist(), top.values.tolist()):
            assert abs(entry[t] - lp) < 1e-3


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_speculative_greedy_output_is_plain_greedy(models, method):
    """On the default model (fp32): a passage to repeat gives n-gram lookup and the int4 self-draft
    drafts to accept, and the output is plain greedy decoding's, token for token."""
    engine, _ = models
    prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": (
        "Repeat this text exactly: The scheduler watches for newly created pods that have no node "
        "assigned, and finds the best node for each pod to run on.")}])
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    want = engine.generate([prompt], params)[0].output_token_ids
    spec = Engine(max_model_len=512, num_kv_blocks=64, speculative_method=method, num_speculative_tokens=4,
                  dtype="float32")
    assert spec.generate([prompt], params)[0].output_token_ids == want
    assert spec.stats().speculative.num_accepted_tokens > 0
