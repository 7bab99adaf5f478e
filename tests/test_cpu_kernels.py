"""The C++ CPU kernels (kernels/cpu_kernels.cpp) against the torch path they replace, at every ISA
tier this CPU runs (lower tiers forced; tests/test_cpu_tiers.py has the quantized matmuls)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kubeinfer.worker import Engine, SamplingParams
from kubeinfer.worker.kernels.attention import AttentionMetadata, LayerKVCache, paged_attention, write_kv
from kubeinfer.worker.kernels.cpu import load_cpu_kernels
from kubeinfer.worker.evaluation import prompt_logits
from kubeinfer.worker.models.rope import apply_rotary
from kubeinfer.worker.sampling import Sampler, SamplingBatch

KERNELS = load_cpu_kernels()  # the tier this CPU selects; None without a compiler (nothing runs then)
pytestmark = pytest.mark.skipif(KERNELS is None, reason="the C++ CPU kernels could not be built (no compiler?)")


# bf16 kernels read bf16, compute in fp32 and round once: compared with fp32 math on the same
# bf16 inputs, they must be within one bf16 rounding of the result.
DTYPES = [torch.float32, torch.bfloat16]


def _close(got: torch.Tensor, want_fp32: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got, want_fp32, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(got.float(), want_fp32, rtol=2 ** -8, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_torch(kernels, dtype):
    x = torch.randn(5, 576).to(dtype)
    w = torch.randn(576).to(dtype)
    _close(kernels.rms_norm(x, w, 1e-5), F.rms_norm(x.float(), (576,), w.float(), 1e-5), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_adds_in_place_then_normalizes(kernels, dtype):
    x, residual = torch.randn(5, 576).to(dtype), torch.randn(5, 576).to(dtype)
    w = torch.randn(576).to(dtype)
    summed = x + residual  # rounded to dtype, as the unfused model rounds it
    out = kernels.add_rms_norm_(x, residual, w, 1e-5)
    assert torch.equal(residual, summed)
    _close(out, F.rms_norm(summed.float(), (576,), w.float(), 1e-5), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_in_place_matches_torch(kernels, dtype):
    qkv = torch.randn(4, 9 + 2 * 3, 64).to(dtype)
    cos, sin = torch.randn(4, 1, 64).to(dtype), torch.randn(4, 1, 64).to(dtype)
    want = apply_rotary(qkv[:, :12].float(), cos.float(), sin.float())
    v_before = qkv[:, 12:].clone()
    kernels.rotary_(qkv, cos, sin, 12)
    _close(qkv[:, :12], want, dtype)
    assert torch.equal(qkv[:, 12:], v_before)  # value heads untouched


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_matches_torch(kernels, dtype):
    gate_up = torch.randn(3, 2 * 100) * 4
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, -88.5, 0.0])  # the exp clamp and saturation
    gate_up = gate_up.to(dtype)
    gate, up = gate_up.float().split(100, dim=-1)
    _close(kernels.silu_mul(gate_up), F.silu(gate) * up, dtype)


def test_kernels_reject_mixed_and_unsupported_dtypes(kernels):
    x = torch.randn(2, 64)
    with pytest.raises(RuntimeError, match="weight must have the dtype of the activations"):
        kernels.rms_norm(x, torch.ones(64, dtype=torch.bfloat16), 1e-5)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        kernels.silu_mul(x.half())


# head_dim 64 and 128 take the register-blocked kernels, in groups of at most 4 and 2 query heads:
# 9 heads over 3 kv heads is one group of 3, 7 over 1 is 4 + 3, and 9 over 1 at 128 is 2+2+2+2+1.
# head_dim 40 takes the generic loops. Those kernels score 16 keys at a time: blocks of 24 and 8
# tokens end in a partial group of 16, as a sequence's last block does.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_seqs,width,d,heads,kvh,bs", [
    (1, 1, 64, 9, 3, 16), (1, 9, 64, 9, 3, 16), (6, 5, 64, 9, 3, 16), (2, 3, 64, 7, 1, 16), (4, 5, 128, 9, 1, 16),
    (4, 5, 40, 9, 3, 16), (2, 4, 72, 4, 2, 16), (3, 4, 64, 9, 3, 24), (3, 6, 128, 4, 2, 8)])
def test_write_and_decode_attention_match_torch(kernels, num_seqs, width, d, heads, kvh, bs, dtype):
    torch.manual_seed(num_seqs * 10 + width)
    nb = 40
    k_cache = torch.randn(kvh, nb, bs, d).to(dtype)
    v_cache = torch.randn_like(k_cache)
    qkv = torch.randn(num_seqs, heads + 2 * kvh, d).to(dtype)
    q, k, v = qkv[:, :heads], qkv[:, heads:heads + kvh], qkv[:, heads + kvh:]  # strided views, as in the model
    tables = torch.stack([torch.randperm(nb)[:width] for _ in range(num_seqs)])
    lens = torch.randint(1, width * bs + 1, (num_seqs,))
    lens[0] = width * bs
    pos = lens - 1
    slots = tables[torch.arange(num_seqs), pos // bs] * bs + pos % bs
    ours_k, ours_v = k_cache.clone(), v_cache.clone()
    write_kv(LayerKVCache(k_cache, v_cache), k, v, slots)
    kernels.write_kv(k, v, ours_k, ours_v, slots)
    assert torch.equal(ours_k, k_cache) and torch.equal(ours_v, v_cache)
    mask = (torch.arange(width * bs)[None] >= lens[:, None]).view(1, num_seqs, 1, width * bs)
    # The reference attends in fp32 over the same (bf16-valued) cache.
    want = paged_attention(q.float(), None, None, LayerKVCache(k_cache.float(), v_cache.float()),
                           AttentionMetadata(slots, num_seqs, tables, mask, []), 0.125)
    got = kernels.decode_attention(q, ours_k, ours_v, tables, lens, 0.125)
    _close(got, want, dtype)


def test_bad_slot_is_an_error_not_a_write_out_of_bounds(kernels):
    cache = torch.zeros(3, 4, 16, 64)
    k = torch.randn(1, 3, 64)
    with pytest.raises(RuntimeError, match="outside the KV cache"):
        kernels.write_kv(k, k, cache, cache.clone(), torch.tensor([4 * 16]))


PROMPTS = [[5 + i, 17, 99, 3, 250 - i] * (3 * i + 1) for i in range(5)]


def test_engine_on_cpp_kernels_matches_torch_path(tiny_llama_dir):
    # Mixed steps (prefill chunks beside decodes), batches shrinking as requests finish, and a
    # prefix-cache hit all go through the cpp backend; greedy tokens must equal the torch path's.
    params = [SamplingParams(temperature=0.0, max_tokens=6 + 4 * i, ignore_eos=True) for i in range(len(PROMPTS))]
    # fp32 only: the torch path runs int8 matmuls on bf16 activations, the cpp one on fp32, so their
    # tokens may legitimately differ (test_quantized_engine bounds int8 against fp32 instead).
    kwargs = dict(model=tiny_llama_dir, max_model_len=256, num_kv_blocks=64, max_num_batched_tokens=32)
    torch_engine = Engine(**kwargs, kernel_backend="torch")
    cpp_engine = Engine(**kwargs, kernel_backend="cpp")
    assert cpp_engine.backend.name == "cpp"
    want = [o.output_token_ids for o in torch_engine.generate(PROMPTS + PROMPTS[:1], params + params[:1])]
    got = [o.output_token_ids for o in cpp_engine.generate(PROMPTS + PROMPTS[:1], params + params[:1])]
    assert got == want


def test_bf16_engine_on_cpp_kernels_is_as_accurate_as_the_torch_path(tiny_llama_dir):
    # A chunk of one token is a decode step: every position below goes through decode_attention
    # (and the norm/rotary/SwiGLU kernels). bf16 rounds differently on the two paths, so each is
    # held to the fp32 engine's logits, and the C++ path must be no less accurate than torch's
    # (mean error: the max over 80 x vocab logits is one outlier, which either path can win).
    ids = list(range(3, 83))
    kwargs = dict(model=tiny_llama_dir, max_model_len=256, num_kv_blocks=32)
    ref = prompt_logits(Engine(**kwargs), ids, chunk=1)
    errors = {}
    for backend in ("torch", "cpp"):
        engine = Engine(**kwargs, dtype="bfloat16", kernel_backend=backend)
        assert engine.backend.name == backend
        errors[backend] = float((prompt_logits(engine, ids, chunk=1) - ref).abs().mean() / ref.abs().mean())
    assert 0 < errors["cpp"] < 0.05
    assert errors["cpp"] <= 1.1 * errors["torch"], errors


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [1, 7, 16, 49152 + 5])
def test_greedy_argmax_takes_the_first_maximum_and_nan_wins(kernels, dtype, vocab):
    torch.manual_seed(vocab)
    logits = torch.randn(6, vocab).to(dtype)
    logits[1] = float("-inf")                              # all equal: index 0
    if vocab > 3:
        logits[2, [2, vocab - 1]] = 50.0                   # a tie between a vector lane and the tail
        logits[3, vocab // 2] = float("nan")               # NaN beats every number
        logits[3, vocab - 1] = float("nan")
        logits[4] = logits[4].round()                      # many ties, in different lanes
        logits[4, [vocab // 3, vocab - 2]] = 9.0
    want = logits.float().max(dim=-1).indices              # torch's rule, on the fp32 widening
    assert torch.equal(kernels.greedy_argmax(logits), want)
    assert torch.equal(kernels.greedy_argmax(logits[:, :]), want)
    strided = torch.cat([logits, logits], dim=1)[:, :vocab]  # rows of a wider tensor
    assert torch.equal(kernels.greedy_argmax(strided), want)


def test_sampler_takes_plain_greedy_argmax_of_bf16_logits_and_widens_for_the_rest():
    torch.manual_seed(0)
    logits = (torch.randn(4, 300) * 3).to(torch.bfloat16)
    greedy = [SamplingParams(temperature=0.0) for _ in range(4)]

    def batch(params):
        return SamplingBatch.build(params, [[1, 2]] * 4, [[3]] * 4, [None] * 4, 300)

    want = logits.float().max(dim=-1).indices
    assert batch(greedy).plain_greedy
    assert torch.equal(Sampler(KERNELS.greedy_argmax)(logits, batch(greedy)).token_ids, want)
    assert torch.equal(Sampler()(logits, batch(greedy)).token_ids, want)
    # A penalty or logprobs need fp32 logits: the sampler widens them itself.
    penalised = [SamplingParams(temperature=0.0, repetition_penalty=1.5) for _ in range(4)]
    assert not batch(penalised).plain_greedy
    assert torch.equal(Sampler(KERNELS.greedy_argmax)(logits, batch(penalised)).token_ids,
                       Sampler()(logits.float(), batch(penalised)).token_ids)
    with_logprobs = [SamplingParams(temperature=0.0, logprobs=2) for _ in range(4)]
    out = Sampler(KERNELS.greedy_argmax)(logits, batch(with_logprobs))
    assert out.logprobs is not None and out.logprobs.dtype == torch.float32
    assert torch.equal(out.token_ids, want)
