"""The whole engine on the Triton backend, run here in Triton's interpreter, against the torch reference.

This is the CUDA path minus the GPU: the same backend object, kernels, metadata and quantized
modules that ``device="cuda"`` chooses, on CPU tensors. Each run mixes chunked prefill, prefix-cache
hits, batched decodes and a preemption (the KV pool is too small for every request at once), and
must give the reference's greedy tokens exactly.
"""

from __future__ import annotations

import pytest
import torch

from tests.triton_interp import triton_interpreter  # noqa: F401 (autouse: the interpreter for this module)

from kubeinfer.worker import Engine, EngineConfig, SamplingParams
from kubeinfer.worker.kernels import quant_linear as ql
from kubeinfer.worker.kernels.torch_backend import TorchBackend
from kubeinfer.worker.models.loader import load_model

# Two prompts share a 2-block prefix (a prefix-cache hit); prompts longer than the 16-token budget are
# chunked; the pool of 12 blocks cannot hold all four requests' 40-odd tokens at once: preemption.
PROMPTS = [list(range(3, 40)), list(range(3, 40)) + [7, 8, 9], [11, 12, 13], [200 + i for i in range(21)]]
PARAMS = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=2)
# Two greedy runs may part only where the reference's best two tokens are this close (nats), and the
# other run must then have picked the reference's second: vLLM's check_logprobs_close. fp16 rounds
# at a different point in each kernel (e.g. a dequantized weight is rounded to fp16 before the torch
# matmul, kept in fp32 registers by Triton's), so its ties are wider than fp32's.
TIE_NATS = {"float32": 1e-3, "float16": 2e-2}


class ReferenceBackend(TorchBackend):
    """The torch backend with the reference quantized modules everywhere (dequantize, then matmul in
    the activation dtype), so that only the kernels under test differ, not the int8/int4 arithmetic
    (the CPU's aten kernels round activations to bf16)."""

    def quantized_linear(self, scheme, state, bias):
        if scheme.name == "int8":
            return ql.Int8Linear(state["qweight"], state["scales"], bias)
        return ql.Int4Linear(state["qweight"], state["scales"], state["mins"], scheme.group_size, bias)


def _run(path: str, backend: str, dtype: str, quantization: str | None, kv: str) -> tuple[list, Engine]:
    config = EngineConfig(model=path, device="cpu", kernel_backend=backend, dtype=dtype, quantization=quantization,
                          kv_cache_dtype=kv, max_model_len=64, num_kv_blocks=12, block_size=8,
                          max_num_batched_tokens=16, max_num_seqs=4)
    loaded = None
    if backend == "torch":
        loaded = load_model(path, config.torch_dtype, 64, quantization,
                            backend=ReferenceBackend("cpu", config.torch_dtype, kv == "int8"))
    engine = Engine(config, loaded=loaded)
    ids = [engine.add_request(prompt_token_ids=p, params=PARAMS) for p in PROMPTS]
    tokens: dict[str, list[int]] = {i: [] for i in ids}
    logprobs: dict[str, list[dict[int, float]]] = {i: [] for i in ids}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
            logprobs[out.request_id] += out.logprobs or []
    return [(tokens[i], logprobs[i]) for i in ids], engine


def _assert_same_greedy(got: list, want: list, tie: float) -> None:
    for (tokens, _), (ref, ref_logprobs) in zip(got, want):
        for i, (a, b) in enumerate(zip(tokens, ref)):
            if a != b:
                best = sorted(ref_logprobs[i].items(), key=lambda kv: -kv[1])
                assert a == best[1][0] and best[0][1] - best[1][1] < tie, (i, tokens, ref, best)
                break


CASES = [  # (model, dtype, weights, kv): every dtype x weights x kv pair appears, on both models
    ("llama", "float32", None, "auto"), ("llama", "float32", "int8", "int8"), ("llama", "float32", "int4", "auto"),
    ("llama", "float16", None, "int8"), ("llama", "float16", "int8", "auto"), ("llama", "float16", "int4", "int8"),
    ("qwen2", "float32", None, "int8"), ("qwen2", "float32", "int4", "int8"), ("qwen2", "float16", None, "auto"),
    ("qwen2", "float16", "int8", "int8"), ("qwen2", "float32", "int8", "auto"), ("qwen2", "float16", "int4", "auto"),
]


@pytest.mark.parametrize("family,dtype,quantization,kv", CASES, ids=lambda v: str(v))
def test_triton_engine_matches_torch_reference(family, dtype, quantization, kv, tiny_llama_dir, tiny_qwen_dir):
    path = tiny_llama_dir if family == "llama" else tiny_qwen_dir
    want, _ = _run(path, "torch", dtype, quantization, kv)
    got, engine = _run(path, "triton", dtype, quantization, kv)
    assert engine.backend.name == "triton"
    _assert_same_greedy(got, want, TIE_NATS[dtype])
    stats = engine.stats()
    assert stats.prefix_cache_hits > 0 and stats.num_preemptions > 0, stats


def test_triton_modules_are_the_backends(tiny_llama_dir):
    """Built once: the quantized linears are the Triton modules and the norms call Triton kernels."""
    from kubeinfer.worker.kernels import triton_norm
    _, engine = _run(tiny_llama_dir, "triton", "float32", "int4", "auto")
    model = engine.runner.model
    assert all(isinstance(layer.mlp.down_proj, ql.TritonInt4Linear) for layer in model.layers)
    assert isinstance(model.quantized_head, ql.TritonInt8Linear)
    assert model.norm._norm is triton_norm.rms_norm
    assert model.layers[0].attn._attention.__self__ is engine.backend
    assert torch.equal(engine.runner.kv_caches[0].k.new_zeros(0), torch.zeros(0))  # caches on the CPU here


def test_sampling_options_on_triton_match_the_torch_reference(tiny_qwen_dir):
    """Every sampling option goes through the same sampler on either backend: seeded requests draw the
    same tokens when the logits agree (fp32, float weights)."""
    params = [SamplingParams(temperature=0.8, top_k=20, seed=1, max_tokens=6, ignore_eos=True),
              SamplingParams(temperature=1.2, top_p=0.9, min_p=0.05, seed=2, max_tokens=6, ignore_eos=True),
              SamplingParams(temperature=0.7, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.4,
                             seed=3, max_tokens=6, ignore_eos=True, logprobs=3),
              SamplingParams(temperature=0.0, stop_token_ids=[7], max_tokens=6, logprobs=0)]
    outs = {}
    for backend in ("torch", "triton"):
        engine = Engine(EngineConfig(model=tiny_qwen_dir, device="cpu", kernel_backend=backend, max_model_len=64,
                                     num_kv_blocks=32, block_size=8, max_num_batched_tokens=16))
        outs[backend] = [(o.output_token_ids, o.finish_reason) for o in engine.generate(PROMPTS, params)]
    assert outs["triton"] == outs["torch"]
    assert len({tuple(t) for t, _ in outs["torch"]}) == len(PROMPTS)  # the requests really sampled apart


def test_speculative_decoding_on_triton_is_plain_greedy(tiny_llama_dir, monkeypatch):
    """Drafts verified as decode rows through the Triton kernels (interpreted): the output is the
    same backend's plain greedy output, with drafts both accepted and rejected."""
    from tests.test_speculative import OracleProposer

    def run(**speculative):
        engine = Engine(EngineConfig(model=tiny_llama_dir, device="cpu", kernel_backend="triton", max_model_len=64,
                                     num_kv_blocks=32, block_size=8, max_num_batched_tokens=16, **speculative))
        outs = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
        return [o.output_token_ids for o in outs], engine

    plain, _ = run()
    monkeypatch.setattr("kubeinfer.worker.speculative.ngram_proposal",
                        OracleProposer({tuple(p): o for p, o in zip(PROMPTS, plain)}))
    got, engine = run(speculative_method="ngram", num_speculative_tokens=3)
    assert got == plain
    stats = engine.stats().speculative
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens
