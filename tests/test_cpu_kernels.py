"""The C++ CPU kernels (kernels/cpu_kernels.cpp) against the torch path they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kubeinfer.worker import Engine, SamplingParams
from kubeinfer.worker.kernels import resolve_attention_backend
from kubeinfer.worker.kernels.attention import AttentionMetadata, LayerKVCache, paged_attention, write_kv
from kubeinfer.worker.kernels.cpu import load_cpu_kernels
from kubeinfer.worker.models.rope import apply_rotary
from kubeinfer.worker.quant import Int4WeightOnly, Int8WeightOnly

KERNELS = load_cpu_kernels()
pytestmark = pytest.mark.skipif(KERNELS is None, reason="the C++ CPU kernels could not be built (no compiler?)")


def test_rms_norm_matches_torch():
    x = torch.randn(5, 576)
    w = torch.randn(576)
    torch.testing.assert_close(KERNELS.rms_norm(x, w, 1e-5), F.rms_norm(x, (576,), w, 1e-5), rtol=1e-5, atol=1e-6)


def test_rotary_in_place_matches_torch():
    qkv = torch.randn(4, 9 + 2 * 3, 64)
    cos, sin = torch.randn(4, 1, 64), torch.randn(4, 1, 64)
    want = apply_rotary(qkv[:, :12], cos, sin)
    v_before = qkv[:, 12:].clone()
    KERNELS.rotary_(qkv, cos, sin, 12)
    torch.testing.assert_close(qkv[:, :12], want, rtol=1e-5, atol=1e-6)
    assert torch.equal(qkv[:, 12:], v_before)  # value heads untouched


def test_silu_mul_matches_torch():
    gate_up = torch.randn(3, 2 * 100) * 4
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, -88.5, 0.0])  # the exp clamp and saturation
    gate, up = gate_up.split(100, dim=-1)
    torch.testing.assert_close(KERNELS.silu_mul(gate_up), F.silu(gate) * up, rtol=1e-5, atol=1e-6)


def test_int8_gemv_matches_dequantized_linear():
    scheme = Int8WeightOnly()
    state = scheme.quantize(torch.randn(200, 96))
    x = torch.randn(3, 96)
    want = x @ scheme.dequantize(state).T
    got = KERNELS.int8_gemv(x, state["qweight"], state["scales"].float())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    bias = torch.randn(200)
    linear = scheme.make_linear(state, bias=bias)
    linear.kernels = KERNELS  # the module's decode branch, bias included
    torch.testing.assert_close(linear(x), want + bias, rtol=1e-4, atol=1e-4)


def test_int4pack_linear_matches_the_module_path():
    scheme = Int4WeightOnly(group_size=32)
    linear = scheme.make_linear(scheme.quantize(torch.randn(64, 96)), bias=torch.randn(64))  # Qwen2's qkv has one
    assert linear.cpu_packed
    x = torch.randn(3, 96)
    want = linear(x)  # the module's own path: bf16 casts around the same aten kernel
    linear.kernels = KERNELS
    torch.testing.assert_close(linear(x), want, rtol=0, atol=0)


@pytest.mark.parametrize("num_seqs,width", [(1, 1), (1, 9), (6, 5)])
def test_write_and_decode_attention_match_torch(num_seqs, width):
    torch.manual_seed(num_seqs * 10 + width)
    kvh, nb, bs, d, heads = 3, 40, 16, 64, 9
    k_cache = torch.randn(kvh, nb, bs, d)
    v_cache = torch.randn_like(k_cache)
    qkv = torch.randn(num_seqs, heads + 2 * kvh, d)
    q, k, v = qkv[:, :heads], qkv[:, heads:heads + kvh], qkv[:, heads + kvh:]  # strided views, as in the model
    tables = torch.stack([torch.randperm(nb)[:width] for _ in range(num_seqs)])
    lens = torch.randint(1, width * bs + 1, (num_seqs,))
    lens[0] = width * bs
    pos = lens - 1
    slots = tables[torch.arange(num_seqs), pos // bs] * bs + pos % bs
    ours_k, ours_v = k_cache.clone(), v_cache.clone()
    write_kv(LayerKVCache(k_cache, v_cache), k, v, slots)
    KERNELS.write_kv(k, v, ours_k, ours_v, slots)
    assert torch.equal(ours_k, k_cache) and torch.equal(ours_v, v_cache)
    mask = (torch.arange(width * bs)[None] >= lens[:, None]).view(1, num_seqs, 1, width * bs)
    want = paged_attention(q, k, v, LayerKVCache(k_cache, v_cache), AttentionMetadata(slots, num_seqs, tables, mask, []),
                           0.125)
    got = KERNELS.decode_attention(q, ours_k, ours_v, tables, lens, 0.125)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bad_slot_is_an_error_not_a_write_out_of_bounds():
    cache = torch.zeros(3, 4, 16, 64)
    k = torch.randn(1, 3, 64)
    with pytest.raises(RuntimeError, match="outside the KV cache"):
        KERNELS.write_kv(k, k, cache, cache.clone(), torch.tensor([4 * 16]))


def test_auto_picks_cpp_only_where_it_applies():
    assert resolve_attention_backend("auto", "cpu") == "cpp"
    assert resolve_attention_backend("auto", "cpu", torch.bfloat16) == "torch"
    assert resolve_attention_backend("auto", "cpu", kv_int8=True) == "torch"
    assert resolve_attention_backend("auto", "cpu", compile_decode=True) == "torch"
    with pytest.raises(ValueError, match="cpp"):
        resolve_attention_backend("cpp", "cpu", kv_int8=True)


PROMPTS = [[5 + i, 17, 99, 3, 250 - i] * (3 * i + 1) for i in range(5)]


def test_engine_on_cpp_kernels_matches_torch_path(tiny_llama_dir):
    # Mixed steps (prefill chunks beside decodes), batches shrinking as requests finish, and a
    # prefix-cache hit all go through the cpp backend; greedy tokens must equal the torch path's.
    params = [SamplingParams(temperature=0.0, max_tokens=6 + 4 * i, ignore_eos=True) for i in range(len(PROMPTS))]
    # fp32 only: the torch path runs int8 matmuls on bf16 activations, the cpp one on fp32, so their
    # tokens may legitimately differ (test_quantized_engine bounds int8 against fp32 instead).
    kwargs = dict(model=tiny_llama_dir, max_model_len=256, num_kv_blocks=64, max_num_batched_tokens=32)
    torch_engine = Engine(**kwargs, attention_backend="torch")
    cpp_engine = Engine(**kwargs, attention_backend="cpp")
    assert cpp_engine.runner.attention_backend == "cpp"
    want = [o.output_token_ids for o in torch_engine.generate(PROMPTS + PROMPTS[:1], params + params[:1])]
    got = [o.output_token_ids for o in cpp_engine.generate(PROMPTS + PROMPTS[:1], params + params[:1])]
    assert got == want
