"""Triton kernels against the torch path, run on the CPU through the Triton interpreter.

``triton.jit`` decides at decoration time whether a function is interpreted, for triton's own helpers
(``tl.zeros``, ``tl.sum``, ...) when triton is imported and for ours when the kernel modules are. So
TRITON_INTERPRET=1 is set before either is imported; if something imported triton first (in a full
run, ``transformers.modeling_utils`` does at collection), triton's Python modules are imported afresh
and the kernel modules reloaded. Triton also reads the flag at launch time, so a fixture keeps it set
while these tests run and restores it afterwards. Shapes are small: interpreter cost grows with
programs x loop steps.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest


def _is_interpreted(triton_module) -> bool:
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(triton_module.language.zeros, InterpretedFunction)


def _import_interpreted_triton():
    import triton
    if not _is_interpreted(triton):
        # Keep the compiled extension (it cannot be initialised twice); re-run the Python modules.
        for name in [m for m in sys.modules if m.split(".")[0] == "triton" and not m.startswith("triton._C")]:
            del sys.modules[name]
        import triton
    return triton


_previous = os.environ.get("TRITON_INTERPRET")


def _restore_interpret() -> None:
    if _previous is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _previous


os.environ["TRITON_INTERPRET"] = "1"
try:
    pytest.importorskip("triton", reason="triton is not installed (pip install triton)")
    _triton = _import_interpreted_triton()
    import torch

    from kubeinfer.worker.kernels import triton_attention as ta
    from kubeinfer.worker.kernels import triton_matmul as tm
    for _mod in (ta, tm):
        if _mod.triton is not _triton or not _mod._INTERPRET:  # imported before: decorate the kernels again
            importlib.reload(_mod)
finally:
    _restore_interpret()

if not (_is_interpreted(_triton) and ta._INTERPRET and tm._INTERPRET):
    pytest.skip("the triton interpreter could not be enabled (triton.knobs.runtime.interpret forced off?)",
                allow_module_level=True)

from kubeinfer.worker.kernels.attention import (  # noqa: E402
    AttentionMetadata, LayerKVCache, PrefillChunk, paged_attention, write_kv)


@pytest.fixture(autouse=True, scope="module")
def _triton_interpreter():
    os.environ["TRITON_INTERPRET"] = "1"
    yield
    _restore_interpret()


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 3e-2}


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.to(dtype).float(), atol=TOL[dtype], rtol=TOL[dtype])


# ---------------------------------------------------------------- matmuls

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 37])
def test_w8a16_matmul(dtype, m):
    torch.manual_seed(0)
    n, k = 80, 200  # neither a multiple of the tiles
    q, s = tm.quantize_int8(torch.randn(n, k) * 0.05)
    x = torch.randn(m, k).to(dtype)
    ref = x.float() @ tm.dequantize_int8(q, s).T
    assert_close(tm.w8a16_matmul(x, q, s), ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 37])
def test_w4a16_matmul(dtype, m):
    torch.manual_seed(0)
    n, k, g = 80, 200, 40
    packed, s, z = tm.quantize_int4(torch.randn(n, k) * 0.05, g)
    x = torch.randn(2, m, k).to(dtype)  # leading dims are flattened
    ref = x.float() @ tm.dequantize_int4(packed, s, z, g).T
    assert_close(tm.w4a16_matmul(x, packed, s, z, g), ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_w4a16_matmul_mins(dtype):
    """The ``quant.Int4WeightOnly`` state: ``W = q * scales[n, g] + mins[n, g]``, groups last."""
    torch.manual_seed(1)
    n, k, g = 48, 96, 32
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    scales = (torch.rand(n, k // g) * 0.01).half()
    mins = (torch.randn(n, k // g) * 0.05).half()
    w = q.float() * scales.float().repeat_interleave(g, 1) + mins.float().repeat_interleave(g, 1)
    x = torch.randn(5, k).to(dtype)
    assert_close(tm.w4a16_matmul_mins(x, tm.pack_int4(q), scales, mins, g), x.float() @ w.T, dtype)


def test_int4_packing_layout():
    q = torch.randint(0, 16, (6, 10), dtype=torch.uint8)
    packed = tm.pack_int4(q)
    assert packed.shape == (6, 5)
    assert torch.equal(packed[:, 0], q[:, 0] | (q[:, 1] << 4))  # low nibble = even k
    assert torch.equal(tm.unpack_int4(packed), q)
    s, z = torch.rand(2, 6) + 0.5, torch.randint(0, 16, (2, 6)).float()
    w = tm.dequantize_int4(packed, s, z, 5)
    assert torch.allclose(w[3, 7], (q[3, 7] - z[1, 3]) * s[1, 3])
    with pytest.raises(ValueError, match="even K"):
        tm.pack_int4(torch.zeros(2, 3, dtype=torch.uint8))
    with pytest.raises(AssertionError, match="group_size"):
        tm.w4a16_matmul(torch.randn(1, 10), packed, torch.ones(2, 6), torch.ones(2, 6), 4)


# ---------------------------------------------------------------- attention

H, KVH, D, BS, NUM_BLOCKS = 4, 2, 32, 4, 40
LAYOUTS = pytest.mark.parametrize("heads_first", [False, True], ids=["blocks_first", "heads_first"])


def to_layout(cache: torch.Tensor, heads_first: bool) -> torch.Tensor:
    """A blocks-first ``[nb, bs, kvh, ...]`` cache (or its scales) in the requested layout."""
    if not heads_first:
        return cache.clone()
    return (cache.permute(2, 0, 1, 3) if cache.dim() == 4 else cache.permute(2, 0, 1)).contiguous()


def from_layout(cache: torch.Tensor, heads_first: bool) -> torch.Tensor:
    return cache.permute(1, 2, 0, 3) if heads_first else cache


def make_tables(lens: list[int], gen: torch.Generator) -> list[list[int]]:
    """Disjoint, shuffled block ids per sequence."""
    ids = torch.randperm(NUM_BLOCKS, generator=gen).tolist()
    tables, used = [], 0
    for n in lens:
        nb = -(-n // BS)
        tables.append(ids[used:used + nb])
        used += nb
    return tables


def padded(tables: list[list[int]], dtype=torch.int32) -> torch.Tensor:
    width = max(len(t) for t in tables)
    return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=dtype)


def gather(cache: torch.Tensor, table: list[int], n: int) -> torch.Tensor:
    """The first ``n`` tokens of a sequence from a blocks-first cache: ``[n, kvh, d]``."""
    return cache[torch.tensor(table)].flatten(0, 1)[:n]


def dense_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, q_pos: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """fp32 reference: ``q [n, H, d]`` at positions ``q_pos`` over keys/values ``[L, KVH, d]``, causal."""
    group = q.shape[1] // keys.shape[1]
    k = keys.float().repeat_interleave(group, dim=1)
    v = values.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,lhd->hnl", q.float(), k) * scale
    scores.masked_fill_(torch.arange(len(keys))[None, None, :] > q_pos[None, :, None], float("-inf"))
    return torch.einsum("hnl,lhd->nhd", scores.softmax(-1), v)


def decode_case(dtype: torch.dtype, lens: list[int], seed: int = 0):
    """Random blocks-first caches, queries, tables and the dense reference's inputs."""
    gen = torch.Generator().manual_seed(seed)
    tables = make_tables(lens, gen)
    k_cache = torch.randn(NUM_BLOCKS, BS, KVH, D, generator=gen).to(dtype)
    v_cache = torch.randn(NUM_BLOCKS, BS, KVH, D, generator=gen).to(dtype)
    q = torch.randn(len(lens), H, D, generator=gen).to(dtype)
    return q, k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int32)


def decode_reference(q, k_cache, v_cache, tables, lens, scale) -> torch.Tensor:
    return torch.cat([dense_attention(q[i:i + 1], gather(k_cache, t, n), gather(v_cache, t, n),
                                      torch.tensor([n - 1]), scale)
                      for i, (t, n) in enumerate(zip(tables, lens.tolist()))])


@LAYOUTS
@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_decode_attention(dtype, heads_first):
    lens = [1, 7, 70, 16]  # < block, not a multiple of it, > one key tile, exact multiple
    q, kc, vc, tables, seq_lens = decode_case(dtype, lens)
    scale = D ** -0.5
    ref = decode_reference(q, kc, vc, tables, seq_lens, scale)
    out = ta.paged_decode_attention(q, to_layout(kc, heads_first), to_layout(vc, heads_first),
                                    padded(tables), seq_lens, scale, heads_first=heads_first)
    assert_close(out, ref, dtype)


def test_paged_decode_attention_mha_int64_and_empty():
    q, kc, vc, tables, seq_lens = decode_case(torch.float32, [5, 9], seed=1)
    kc, vc = kc.repeat_interleave(2, dim=2), vc.repeat_interleave(2, dim=2)  # KVH == H
    ref = decode_reference(q, kc, vc, tables, seq_lens, 0.3)
    out = ta.paged_decode_attention(q, kc, vc, padded(tables, torch.long), seq_lens.long(), 0.3)
    assert_close(out, ref, torch.float32)
    out = ta.paged_decode_attention(q, kc, vc, padded(tables), torch.tensor([0, 9], dtype=torch.int32), 0.3)
    assert torch.equal(out[0], torch.zeros(H, D))


@LAYOUTS
@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_decode_attention_int8kv(dtype, heads_first):
    lens = [3, 13, 33]
    q, kc, vc, tables, seq_lens = decode_case(dtype, lens, seed=2)
    kq, ks = ta.quantize_kv_int8(kc)
    vq, vs = ta.quantize_kv_int8(vc)
    assert kq.dtype == torch.int8 and ks.shape == (NUM_BLOCKS, BS, KVH) and ks.dtype == torch.float32
    scale = D ** -0.5
    ref = decode_reference(q, ta.dequantize_kv_int8(kq, ks), ta.dequantize_kv_int8(vq, vs), tables,
                           seq_lens, scale)
    lay = lambda x: to_layout(x, heads_first)  # noqa: E731
    out = ta.paged_decode_attention_int8kv(q, lay(kq), lay(vq), lay(ks), lay(vs), padded(tables), seq_lens,
                                           scale, heads_first=heads_first)
    assert_close(out, ref, dtype)
    # The quantization error is at most half a step.
    assert ((ta.dequantize_kv_int8(kq, ks) - kc.float()).abs() <= ks[..., None] / 2 + 1e-6).all()


@LAYOUTS
def test_write_kv_int8_matches_quantize(heads_first):
    gen = torch.Generator().manual_seed(3)
    k, v = torch.randn(5, KVH, D, generator=gen), torch.randn(5, KVH, D, generator=gen)
    caches = [to_layout(torch.zeros(NUM_BLOCKS, BS, KVH, D, dtype=torch.int8), heads_first) for _ in range(2)]
    scales = [to_layout(torch.zeros(NUM_BLOCKS, BS, KVH), heads_first) for _ in range(2)]
    slots = torch.tensor([9, 2, 30, 31, 0])
    ta.write_kv_int8(*caches, *scales, k, v, slots, heads_first=heads_first)
    for cache, sc, x in ((caches[0], scales[0], k), (caches[1], scales[1], v)):
        got = ta.dequantize_kv_int8(cache, sc)
        got = from_layout(got, heads_first).reshape(-1, KVH, D)[slots]
        assert torch.equal(got, ta.dequantize_kv_int8(*ta.quantize_kv_int8(x)))


def prefill_case(dtype: torch.dtype, specs: list[tuple[int, int]], seed: int = 4):
    """Flattened chunks for ``(cached prefix, new tokens)`` specs, with blocks-first caches."""
    gen = torch.Generator().manual_seed(seed)
    ctx_lens = [p + n for p, n in specs]
    tables = make_tables(ctx_lens, gen)
    k_cache = torch.randn(NUM_BLOCKS, BS, KVH, D, generator=gen).to(dtype)  # garbage + cached prefixes
    v_cache = torch.randn(NUM_BLOCKS, BS, KVH, D, generator=gen).to(dtype)
    t = sum(n for _, n in specs)
    q = torch.randn(t, H, D, generator=gen).to(dtype)
    k = torch.randn(t, KVH, D, generator=gen).to(dtype)
    v = torch.randn(t, KVH, D, generator=gen).to(dtype)
    slots = torch.cat([torch.tensor([table[p // BS] * BS + p % BS for p in range(prefix, prefix + n)])
                       for (prefix, n), table in zip(specs, tables)])
    cu = torch.tensor([0] + [n for _, n in specs]).cumsum(0).to(torch.int32)
    return q, k, v, k_cache, v_cache, slots, cu, torch.tensor(ctx_lens, dtype=torch.int32), tables


@LAYOUTS
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_attention(dtype, heads_first):
    # (cached prefix, new tokens): fresh prompts, later chunks / prefix hits, 1-token chunks.
    specs = [(0, 11), (6, 9), (0, 1), (13, 70), (5, 1)]
    q, k, v, kc, vc, slots, cu, ctx, tables = prefill_case(dtype, specs)
    scale = D ** -0.5
    ref_k, ref_v = kc.clone(), vc.clone()
    ref_k.view(-1, KVH, D)[slots] = k
    ref_v.view(-1, KVH, D)[slots] = v
    ref = torch.cat([dense_attention(q[cu[i]:cu[i + 1]], gather(ref_k, table, n), gather(ref_v, table, n),
                                     torch.arange(n - (cu[i + 1] - cu[i]), n), scale)
                     for i, (table, n) in enumerate(zip(tables, ctx.tolist()))])

    k_cache, v_cache = to_layout(kc, heads_first), to_layout(vc, heads_first)
    out = ta.prefill_attention(q, k, v, k_cache, v_cache, slots, cu, ctx, padded(tables), scale,
                               heads_first=heads_first)
    assert_close(out, ref, dtype)
    assert torch.equal(from_layout(k_cache, heads_first), ref_k)
    assert torch.equal(from_layout(v_cache, heads_first), ref_v)


def test_mixed_batch_matches_paged_attention():
    """Decodes then prefill chunks, heads-first caches, metadata built as ``ModelRunner.prepare`` does."""
    decode_lens = [9, 1]
    specs = [(n - 1, 1) for n in decode_lens] + [(0, 7), (10, 6)]
    q, k, v, kc, vc, slots, cu, ctx, tables = prefill_case(torch.float32, specs, seed=5)
    k_cache, v_cache = to_layout(kc, True), to_layout(vc, True)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    write_kv(LayerKVCache(ref_k, ref_v), k, v, slots)
    nd, scale = len(decode_lens), D ** -0.5
    dec_tables = padded(tables[:nd], torch.long)
    lens = torch.tensor(decode_lens)
    dec_mask = (torch.arange(dec_tables.shape[1] * BS)[None] >= lens[:, None]).view(1, nd, 1, -1)
    chunks = []
    for i in range(nd, len(specs)):
        prefix, n = specs[i]
        pos = torch.arange(prefix, prefix + n)
        mask = None if prefix == 0 else torch.arange(prefix + n)[None] <= pos[:, None]
        chunks.append(PrefillChunk(int(cu[i]), int(cu[i + 1]), prefix + n, torch.tensor(tables[i]), mask))
    meta = AttentionMetadata(slots, nd, dec_tables, dec_mask, chunks)
    ref = paged_attention(q, k, v, LayerKVCache(ref_k, ref_v), meta, scale)

    out = ta.prefill_attention(q, k, v, k_cache, v_cache, slots, cu, ctx, padded(tables), scale,
                               heads_first=True)
    assert_close(out, ref, torch.float32)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)
    dec = ta.paged_decode_attention(q[:nd], k_cache, v_cache, dec_tables, lens, scale, heads_first=True)
    assert_close(dec, ref[:nd], torch.float32)


def test_write_kv_cache_skips_padding_slots():
    k_cache = torch.zeros(NUM_BLOCKS, BS, KVH, D)
    v_cache = torch.zeros(NUM_BLOCKS, BS, KVH, D)
    k, v = torch.randn(3, KVH, D), torch.randn(3, KVH, D)
    ta.write_kv_cache(k, v, k_cache, v_cache, torch.tensor([5, -1, 17]))
    flat = k_cache.view(-1, KVH, D)
    assert torch.equal(flat[5], k[0]) and torch.equal(flat[17], k[2])
    assert torch.count_nonzero(flat) == 2 * KVH * D
    assert torch.equal(v_cache.view(-1, KVH, D)[17], v[2])


def test_triton_available():
    assert not ta.triton_available(torch.zeros(1))
    assert not ta.triton_available("cpu")
    assert ta.triton_available("cuda")
    assert "triton" in sys.modules


def test_engine_with_triton_attention_matches_torch(tiny_llama_dir):
    """The dispatch point end to end: the engine on the Triton kernels (interpreted here) produces the
    torch path's greedy tokens, across chunked prefill, prefix-cache hits and batched decodes."""
    from kubeinfer.worker import Engine, SamplingParams
    prompts = [list(range(3, 40)), list(range(3, 40)) + [7, 8, 9], [11, 12, 13]]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    kw = dict(model=tiny_llama_dir, max_model_len=128, num_kv_blocks=32, max_num_batched_tokens=32)
    torch_engine = Engine(kernel_backend="torch", **kw)
    triton_engine = Engine(kernel_backend="triton", **kw)
    assert triton_engine.runner.attention_backend == "triton"
    expected = [o.output_token_ids for o in torch_engine.generate(prompts, params)]
    assert [o.output_token_ids for o in triton_engine.generate(prompts, params)] == expected
    assert triton_engine.stats().prefix_cache_hits > 0
