"""Triton attention kernels (KV write, decode single pass and split-KV, chunked prefill; float and int8
KV) against the torch path of kernels/attention.py, run on the CPU through the Triton interpreter (see
tests/triton_interp.py). Caches use the engine's heads-first layout unless a test says otherwise."""

from __future__ import annotations

import pytest

from tests.triton_interp import assert_close, ta, td, triton_interpreter  # noqa: F401 (autouse fixture)

import torch  # noqa: E402  (after triton_interp: TRITON_INTERPRET must be set before triton is imported)

from kubeinfer.worker.kernels.attention import (  # noqa: E402
    AttentionMetadata, LayerKVCache, PrefillChunk, paged_attention, write_kv)

KVH = 2
NUM_BLOCKS = 48
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def make_tables(lens: list[int], block_size: int, gen: torch.Generator) -> list[list[int]]:
    """Disjoint, shuffled block ids per sequence (at least one block, even for an empty sequence)."""
    ids = torch.randperm(NUM_BLOCKS, generator=gen).tolist()
    tables, used = [], 0
    for n in lens:
        nb = max(1, -(-n // block_size))
        tables.append(ids[used:used + nb])
        used += nb
    assert used <= NUM_BLOCKS
    return tables


def padded(tables: list[list[int]], dtype=torch.int32) -> torch.Tensor:
    width = max(len(t) for t in tables)
    return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=dtype)


def slots_of(table: list[int], positions, block_size: int) -> list[int]:
    return [table[p // block_size] * block_size + p % block_size for p in positions]


def random_cache(kv: str, dtype: torch.dtype, head_dim: int, block_size: int, gen: torch.Generator) -> LayerKVCache:
    """A heads-first cache full of valid random content: float, or int8 with positive fp32 scales."""
    shape = (KVH, NUM_BLOCKS, block_size, head_dim)
    if kv == "float":
        return LayerKVCache(torch.randn(shape, generator=gen).to(dtype), torch.randn(shape, generator=gen).to(dtype))
    q = [torch.randint(-127, 128, shape, generator=gen, dtype=torch.int8) for _ in range(2)]
    s = [torch.rand(shape[:3], generator=gen) * 0.02 + 0.001 for _ in range(2)]
    return LayerKVCache(q[0], q[1], s[0], s[1])


def clone_cache(c: LayerKVCache) -> LayerKVCache:
    return LayerKVCache(*(None if t is None else t.clone() for t in c))


def fp32_cache(c: LayerKVCache) -> LayerKVCache:
    """The same cache for an fp32 reference: int8 stays (the torch path dequantizes to fp32)."""
    return c if c.k_scale is not None else LayerKVCache(c.k.float(), c.v.float())


def scales_kw(c: LayerKVCache) -> dict:
    return {} if c.k_scale is None else {"k_scales": c.k_scale, "v_scales": c.v_scale}


def decode_meta(tables: list[list[int]], lens: list[int], block_size: int) -> AttentionMetadata:
    """Decode-only metadata for the torch path, as the torch backend builds it."""
    bt = padded(tables, torch.long)
    mask = torch.arange(bt.shape[1] * block_size)[None] >= torch.tensor(lens)[:, None]
    return AttentionMetadata(torch.zeros(0, dtype=torch.long), len(lens), bt, mask.view(1, len(lens), 1, -1), [])


# ---------------------------------------------------------------- KV write

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
def test_write_kv_cache_int8_is_quantize_kv_int8(dtype):
    """Quantize-on-write is bit-identical to the torch write (round half to even included); a negative
    slot is skipped."""
    gen = torch.Generator().manual_seed(3)
    d = 40
    k = (torch.randn(6, KVH, d, generator=gen) * 3).to(dtype)
    v = torch.randn(6, KVH, d, generator=gen).to(dtype)
    k[0, 0] = 0.0  # an all-zero row: scale 1e-8 / 127
    # amax 127 gives scale 1.0 exactly, so x / scale lands on .5 ties: torch.round goes to even.
    k[1, 1] = torch.tensor([127.0, 2.5, -3.5, 0.5, -0.5, 1.5, -126.5] + [0.25] * (d - 7)).to(dtype)
    slots = torch.tensor([9, 2, -1, 31, 0, 47])
    empty = LayerKVCache(torch.zeros(KVH, NUM_BLOCKS, 16, d, dtype=torch.int8),
                         torch.zeros(KVH, NUM_BLOCKS, 16, d, dtype=torch.int8),
                         torch.zeros(KVH, NUM_BLOCKS, 16), torch.zeros(KVH, NUM_BLOCKS, 16))
    got, ref = clone_cache(empty), clone_cache(empty)
    ta.write_kv_cache(k, v, got.k, got.v, slots, heads_first=True, k_scales=got.k_scale, v_scales=got.v_scale)
    keep = slots >= 0
    write_kv(ref, k[keep], v[keep], slots[keep])
    for g, r in zip(got, ref):
        assert torch.equal(g, r)
    assert torch.equal(ref.k.view(KVH, -1, d)[1, 2, :7], torch.tensor([127, 2, -4, 0, 0, 2, -126], dtype=torch.int8))
    assert torch.count_nonzero(got.k_scale) == 5 * KVH  # the padding token wrote nothing


def test_write_kv_cache_float_skips_padding_slots():
    gen = torch.Generator().manual_seed(4)
    cache = LayerKVCache(torch.zeros(KVH, NUM_BLOCKS, 4, 32, dtype=torch.float16),
                         torch.zeros(KVH, NUM_BLOCKS, 4, 32, dtype=torch.float16))
    ref = clone_cache(cache)
    k, v = torch.randn(3, KVH, 32, generator=gen), torch.randn(3, KVH, 32, generator=gen)
    ta.write_kv_cache(k, v, cache.k, cache.v, torch.tensor([5, -1, 17]), heads_first=True)
    write_kv(ref, k[[0, 2]].half(), v[[0, 2]].half(), torch.tensor([5, 17]))
    assert torch.equal(cache.k, ref.k) and torch.equal(cache.v, ref.v)
    assert torch.count_nonzero(cache.k) == 2 * KVH * 32


# ---------------------------------------------------------------- decode

# (group, head_dim, block_size): MHA, a non-power-of-two head_dim (masked), GQA 4.
DECODE_SHAPES = [(1, 64, 16), (3, 40, 32), (4, 64, 32)]
DECODE_LENS = [0, 5, 33, 150]  # a padding row, < one tile/partition, > one partition, several


@pytest.mark.parametrize("group,head_dim,block_size", DECODE_SHAPES, ids=lambda x: str(x))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("kv", ["float", "int8"])
@pytest.mark.parametrize("split", [False, True], ids=["single", "split"])
def test_paged_decode_attention(split, kv, dtype, group, head_dim, block_size, monkeypatch):
    gen = torch.Generator().manual_seed(group * 100 + head_dim)
    cache = random_cache(kv, dtype, head_dim, block_size, gen)
    tables = make_tables(DECODE_LENS, block_size, gen)
    q = torch.randn(len(DECODE_LENS), KVH * group, head_dim, generator=gen).to(dtype)
    index_dtype = torch.long if group == 4 else torch.int32
    lens = torch.tensor(DECODE_LENS, dtype=index_dtype)
    scale = head_dim ** -0.5
    max_seq_len = None
    if split:
        # 32-position partitions and 4 partials per combine step: several of each on small caches;
        # 160 leaves a partition past every sequence's end.
        monkeypatch.setattr(td, "DECODE_PARTITION_SIZE", 32)
        monkeypatch.setattr(td, "_BLOCK_P", 4)
        max_seq_len = 160
    assert td.decode_partitions(len(DECODE_LENS), KVH, max_seq_len, q.device) == (5 if split else 1)
    out = ta.paged_decode_attention(q, cache.k, cache.v, padded(tables, index_dtype), lens, scale,
                                    heads_first=True, max_seq_len=max_seq_len, **scales_kw(cache))
    rows = [i for i, n in enumerate(DECODE_LENS) if n]
    ref = paged_attention(q[rows].float(), None, None, fp32_cache(cache),
                          decode_meta([tables[i] for i in rows], [DECODE_LENS[i] for i in rows], block_size), scale)
    assert_close(out[rows], ref, dtype)
    assert torch.equal(out[0], torch.zeros_like(out[0]))  # seq_len 0 -> zeros


def test_decode_partitions_host_rule(monkeypatch):
    """Split only when (sequences x kv heads) leaves SMs idle and the bound exceeds one partition."""
    monkeypatch.setattr(td, "DECODE_PARTITION_SIZE", 512)
    assert td.decode_partitions(1, 3, None, "cpu") == 1          # no bound: today's single pass
    assert td.decode_partitions(1, 3, 512, "cpu") == 1           # one partition
    assert td.decode_partitions(1, 3, 4096, "cpu") == 8
    assert td.decode_partitions(4, 8, 2049, "cpu") == 5
    assert td.decode_partitions(64, 3, 4096, "cpu") == 1         # 192 programs fill 132 SMs


def test_decode_rejects_inconsistent_caches():
    q = torch.randn(1, 2, 16)
    kc = torch.zeros(1, 4, 4, 16, dtype=torch.int8)
    with pytest.raises(AssertionError, match="k_scales"):
        ta.paged_decode_attention(q, kc, kc.clone(), torch.zeros(1, 1, dtype=torch.int32),
                                  torch.ones(1, dtype=torch.int32), 1.0, heads_first=True)
    with pytest.raises(AssertionError, match="int8 cache"):
        ta.paged_decode_attention(q, kc.float(), kc.float(), torch.zeros(1, 1, dtype=torch.int32),
                                  torch.ones(1, dtype=torch.int32), 1.0, heads_first=True,
                                  k_scales=torch.ones(1, 4, 4), v_scales=torch.ones(1, 4, 4))


# ---------------------------------------------------------------- prefill and mixed batches

def mixed_batch(kv: str, dtype: torch.dtype, group: int, head_dim: int, block_size: int, seed: int):
    """Two decodes then prefill chunks (fresh prompts, chunks after a cached prefix, a 1-token chunk).

    Returns the inputs, the Triton call's arguments and torch-path metadata in which every chunk has
    an explicit mask, so the torch path reads all keys from the cache as the Triton kernel does (with
    an int8 cache, a fresh chunk then attends to its own keys quantized on both paths).
    """
    specs = [(8, 1), (0, 1), (0, 11), (6, 9), (13, 70), (5, 1)]  # (cached prefix, new tokens)
    nd = 2
    gen = torch.Generator().manual_seed(seed)
    ctx = [p + n for p, n in specs]
    tables = make_tables(ctx, block_size, gen)
    cache = random_cache(kv, dtype, head_dim, block_size, gen)  # the prefixes and garbage elsewhere
    t = sum(n for _, n in specs)
    q = torch.randn(t, KVH * group, head_dim, generator=gen).to(dtype)
    k = torch.randn(t, KVH, head_dim, generator=gen).to(dtype)
    v = torch.randn(t, KVH, head_dim, generator=gen).to(dtype)
    slots = torch.tensor(sum((slots_of(tb, range(p, p + n), block_size) for (p, n), tb in zip(specs, tables)), []))
    cu = torch.tensor([0] + [n for _, n in specs]).cumsum(0).to(torch.int32)
    chunks = []
    for i in range(nd, len(specs)):
        prefix, n = specs[i]
        pos = torch.arange(prefix, prefix + n)
        chunks.append(PrefillChunk(int(cu[i]), int(cu[i + 1]), ctx[i], torch.tensor(tables[i]),
                                   torch.arange(ctx[i])[None] <= pos[:, None]))
    dec = decode_meta(tables[:nd], ctx[:nd], block_size)
    meta = AttentionMetadata(slots, nd, dec.decode_block_tables, dec.decode_mask, chunks)
    args = (slots, cu, torch.tensor(ctx, dtype=torch.int32), padded(tables))
    return q, k, v, cache, args, meta, nd, max(n for _, n in specs)


@pytest.mark.parametrize("group,head_dim,block_size", [(3, 40, 16), (2, 64, 32)], ids=lambda x: str(x))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("kv", ["float", "int8"])
def test_prefill_attention_matches_paged_attention(kv, dtype, group, head_dim, block_size, monkeypatch):
    q, k, v, cache, args, meta, nd, max_q = mixed_batch(kv, dtype, group, head_dim, block_size, seed=5)
    scale = head_dim ** -0.5
    ref_cache = clone_cache(cache)
    write_kv(ref_cache, k, v, meta.slot_mapping)
    ref = paged_attention(q.float(), k.float(), v.float(), fp32_cache(ref_cache), meta, scale)

    out = ta.prefill_attention(q, k, v, cache.k, cache.v, *args, scale, max_q if dtype == torch.float32 else None,
                               heads_first=True, **scales_kw(cache))
    for got, want in zip(cache, ref_cache):  # the write: bit-identical, int8 scales included
        assert (got is None and want is None) or torch.equal(got, want)
    assert_close(out, ref, dtype)
    # The decode kernel reads the same cache the same way (here split over 32-position partitions).
    slots, cu, ctx, tables = args
    monkeypatch.setattr(td, "DECODE_PARTITION_SIZE", 32)
    assert td.decode_partitions(nd, KVH, 128, q.device) == 4
    dec = ta.paged_decode_attention(q[:nd], cache.k, cache.v, tables[:nd], ctx[:nd], scale, heads_first=True,
                                    max_seq_len=128, **scales_kw(cache))
    assert_close(dec, ref[:nd], dtype)


def test_blocks_first_layout_matches_heads_first():
    """The functions' default layout ``[num_blocks, block_size, kv_heads, d]``: same kernels, other strides."""
    q, k, v, cache, args, _, nd, max_q = mixed_batch("int8", torch.float32, 2, 32, 16, seed=6)
    bf = LayerKVCache(*(td.blocks_first(t, True).contiguous() for t in cache))  # int8: no None
    scale = 0.2
    out_hf = ta.prefill_attention(q, k, v, cache.k, cache.v, *args, scale, max_q, heads_first=True,
                                  **scales_kw(cache))
    out_bf = ta.prefill_attention(q, k, v, bf.k, bf.v, *args, scale, max_q, **scales_kw(bf))
    assert torch.equal(out_bf, out_hf)
    for a, b in zip(bf, cache):
        assert torch.equal(a, td.blocks_first(b, True))
    tables, ctx = args[3], args[2]
    dec_bf = ta.paged_decode_attention(q[:nd], bf.k, bf.v, tables[:nd], ctx[:nd], scale, **scales_kw(bf))
    assert_close(dec_bf, out_hf[:nd], torch.float32)


def test_triton_available():
    assert not ta.triton_available(torch.zeros(1))
    assert not ta.triton_available("cpu")
    assert ta.triton_available("cuda")

