"""Paged attention as Triton kernels (decode, int8-KV decode, chunked prefill), plus int8-KV torch references.

Cache layout: K and V are each ``[num_blocks, block_size, num_kv_heads, head_dim]`` ("blocks first",
the default), or ``[num_kv_heads, num_blocks, block_size, head_dim]`` with ``heads_first=True`` (the
layout of the torch path in :mod:`kubeinfer.worker.kernels.attention`, where one head's block is
contiguous). The kernels only use strides, so both work; ``head_dim`` must be contiguous. Token slot ``s``
lives at block ``s // block_size``, offset ``s % block_size``. ``block_tables[i, j]`` is the cache
block holding tokens ``[j * block_size, (j + 1) * block_size)`` of sequence ``i``.

The kernels walk keys in tiles of ``BLOCK_N`` positions and look up each position's block in the
block table, so ``block_size`` is free (any value, not only powers of two or >= 16) and the tile
size stays large enough for ``tl.dot``.

int8 KV layout: int8 caches shaped like the float ones, with fp32 scales shaped like the cache minus
its last dim (``[num_blocks, block_size, kv_heads]``, or ``[kv_heads, num_blocks, block_size]`` heads
first) -- one symmetric scale per (slot, kv head), so a token is quantized once when it is written and
a block never needs requantizing as it fills: ``K[..., :] = k_cache_int8[..., :] * k_scales[...]``
(same for V), i.e. ``scale = max|k| / 127`` over head_dim, ``q = round(k / scale)`` in [-127, 127].
"""

from __future__ import annotations

import torch

from kubeinfer.worker.kernels.attention import quantize_kv_int8  # noqa: F401 (the shared format)

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch references still work
    triton = None

_INTERPRET = triton is not None and bool(triton.knobs.runtime.interpret)


def triton_available(device: torch.device | str | torch.Tensor) -> bool:
    """True when the Triton kernels can run for ``device`` (a CUDA device or tensor, triton importable)."""
    if isinstance(device, torch.Tensor):
        device = device.device
    return triton is not None and torch.device(device).type == "cuda"


def dequantize_kv_int8(q: torch.Tensor, scales: torch.Tensor,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_kv_int8`; also takes a whole cache ``[nb, bs, kvh, d]`` + scales."""
    return (q.float() * scales.float()[..., None]).to(dtype)


def _blocks_first(cache: torch.Tensor, heads_first: bool) -> torch.Tensor:
    """A ``[num_blocks, block_size, kv_heads, ...]`` view of a cache or of its scales (no copy)."""
    if not heads_first:
        return cache
    return cache.permute(1, 2, 0, 3) if cache.dim() == 4 else cache.permute(1, 2, 0)


def write_kv_int8(k_cache: torch.Tensor, v_cache: torch.Tensor, k_scales: torch.Tensor,
                  v_scales: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  slot_mapping: torch.Tensor, heads_first: bool = False) -> None:
    """Torch reference: quantize this step's ``k``/``v`` ``[T, kv_heads, d]``, store them at their slots."""
    block_size = _blocks_first(k_cache, heads_first).shape[1]
    blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
    for cache, scales, x in ((k_cache, k_scales, k), (v_cache, v_scales, v)):
        q, s = quantize_kv_int8(x)
        _blocks_first(cache, heads_first)[blocks, offsets] = q  # writes through the permuted view
        _blocks_first(scales, heads_first)[blocks, offsets] = s


if triton is not None:

    @triton.jit
    def _load_kv_tile(k_ptr, v_ptr, bt_ptr, seq, stride_bt, kvh, stride_kb, stride_ks, stride_kh, block_size,
                      pos, nmask, offs_d, dmask):
        # Each key position finds its block through the block table: block_size need not match the tile.
        blk = tl.load(bt_ptr + seq * stride_bt + pos // block_size, mask=nmask, other=0).to(tl.int64)
        row = blk * stride_kb + (pos % block_size) * stride_ks + kvh * stride_kh
        kvmask = nmask[:, None] & dmask[None, :]
        k = tl.load(k_ptr + row[:, None] + offs_d[None, :], mask=kvmask, other=0)
        v = tl.load(v_ptr + row[:, None] + offs_d[None, :], mask=kvmask, other=0)
        return blk, k, v

    @triton.jit
    def _decode_kernel(q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, bt_ptr, lens_ptr, out_ptr, scale,
                       stride_qt, stride_qh, stride_kb, stride_ks, stride_kh,
                       stride_sb, stride_ss, stride_sh, stride_bt, stride_ot, stride_oh, block_size,
                       GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr,
                       BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, KV_INT8: tl.constexpr,
                       UPCAST: tl.constexpr):
        # One program per (sequence, kv head): all GROUP query heads sharing the kv head are rows of
        # one tile, so each K/V element is read once. Rows are padded to BLOCK_G >= 16 for tl.dot.
        seq = tl.program_id(0)
        kvh = tl.program_id(1).to(tl.int64)  # heads-first caches: kvh * stride can pass 2**31
        seq_len = tl.load(lens_ptr + seq)
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        dmask = offs_d < HEAD_DIM
        gmask = offs_g < GROUP
        heads = kvh * GROUP + offs_g
        q = tl.load(q_ptr + seq * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=gmask[:, None] & dmask[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        # Finite start so that a row with no keys yet gives exp(-inf - m) = 0, not NaN.
        m = tl.full((BLOCK_G,), -1e30, dtype=tl.float32)
        l = tl.zeros((BLOCK_G,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
        for start in range(0, seq_len, BLOCK_N):
            pos = start + offs_n
            nmask = pos < seq_len
            blk, k, v = _load_kv_tile(k_ptr, v_ptr, bt_ptr, seq, stride_bt, kvh, stride_kb, stride_ks, stride_kh,
                                      block_size, pos, nmask, offs_d, dmask)
            if KV_INT8:
                # Per-token scales factor out of the d sum: apply them to score columns / prob columns.
                srow = blk * stride_sb + (pos % block_size) * stride_ss + kvh * stride_sh
                k_s = tl.load(ks_ptr + srow, mask=nmask, other=0.0)
                v_s = tl.load(vs_ptr + srow, mask=nmask, other=0.0)
                k = k.to(q.dtype)
                v = v.to(q.dtype)
            elif UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            if UPCAST:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            if KV_INT8:
                s = s * k_s[None, :]
            s = tl.where(nmask[None, :], s * scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m - m_new)
            l = l * alpha + tl.sum(p, axis=1)
            if KV_INT8:
                p = p * v_s[None, :]
            if UPCAST:
                pv = tl.dot(p, v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m = m_new
        out = acc / tl.where(l > 0, l, 1.0)[:, None]  # empty sequence -> zeros
        tl.store(out_ptr + seq * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=gmask[:, None] & dmask[None, :])

    @triton.jit
    def _write_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, stride_kt, stride_kh,
                         stride_vt, stride_vh, stride_cb, stride_cs, stride_ch, block_size,
                         KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                         BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
        t = tl.program_id(0)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        offs_h = tl.arange(0, BLOCK_H).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        if slot >= 0:  # a negative slot marks a padding token
            mask = (offs_h[:, None] < KV_HEADS) & (offs_d[None, :] < HEAD_DIM)
            dst = (slot // block_size) * stride_cb + (slot % block_size) * stride_cs
            dst = dst + offs_h[:, None] * stride_ch + offs_d[None, :]
            k = tl.load(k_ptr + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
            v = tl.load(v_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
            tl.store(kc_ptr + dst, k.to(kc_ptr.dtype.element_ty), mask=mask)
            tl.store(vc_ptr + dst, v.to(vc_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _prefill_kernel(q_ptr, k_ptr, v_ptr, cu_ptr, ctx_ptr, bt_ptr, out_ptr, scale,
                        stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_bt,
                        stride_ot, stride_oh, block_size,
                        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
        # One program per (query tile, sequence, query head); all keys are read from the cache.
        tile = tl.program_id(0)
        seq = tl.program_id(1)
        head = tl.program_id(2)
        kvh = (head // GROUP).to(tl.int64)
        q_start = tl.load(cu_ptr + seq)
        q_len = tl.load(cu_ptr + seq + 1) - q_start
        ctx = tl.load(ctx_ptr + seq)
        first_pos = ctx - q_len  # the chunk is the last q_len tokens of the context
        offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        mmask = offs_m < q_len
        dmask = offs_d < HEAD_DIM
        q_pos = first_pos + offs_m
        q = tl.load(q_ptr + (q_start + offs_m)[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                    mask=mmask[:, None] & dmask[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        m = tl.full((BLOCK_M,), -1e30, dtype=tl.float32)
        l = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        # Causal: keys up to this tile's last query; tiles past the chunk (grid padding) do nothing.
        kv_end = first_pos + tl.minimum((tile + 1) * BLOCK_M, q_len)
        kv_end = kv_end * (tile * BLOCK_M < q_len).to(tl.int32)
        for start in range(0, kv_end, BLOCK_N):
            pos = start + offs_n
            nmask = pos < kv_end
            blk, k, v = _load_kv_tile(k_ptr, v_ptr, bt_ptr, seq, stride_bt, kvh, stride_kb, stride_ks, stride_kh,
                                      block_size, pos, nmask, offs_d, dmask)
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            causal = nmask[None, :] & (pos[None, :] <= q_pos[:, None])
            s = tl.where(causal, s * scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m - m_new)
            l = l * alpha + tl.sum(p, axis=1)
            if UPCAST:
                pv = tl.dot(p, v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m = m_new
        out = acc / tl.where(l > 0, l, 1.0)[:, None]
        tl.store(out_ptr + (q_start + offs_m)[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=mmask[:, None] & dmask[None, :])


def _upcast(dtype: torch.dtype) -> bool:
    # fp32 gets an exact fp32 dot (no tf32); bf16 is upcast in the interpreter, whose bf16 arithmetic
    # is wrong (triton issue 11584).
    return dtype == torch.float32 or (_INTERPRET and dtype == torch.bfloat16)


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))


def _cache_views(k_cache: torch.Tensor, v_cache: torch.Tensor,
                 heads_first: bool) -> tuple[torch.Tensor, torch.Tensor]:
    kc, vc = _blocks_first(k_cache, heads_first), _blocks_first(v_cache, heads_first)
    # One set of strides is passed for both caches.
    assert kc.stride(-1) == 1 and vc.stride() == kc.stride(), "K and V caches need one layout, d contiguous"
    return kc, vc


def _decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k_scales: torch.Tensor | None,
            v_scales: torch.Tensor | None, block_tables: torch.Tensor, seq_lens: torch.Tensor,
            scale: float, heads_first: bool) -> torch.Tensor:
    num_seqs, num_heads, head_dim = q.shape
    kc, vc = _cache_views(k_cache, v_cache, heads_first)
    _, block_size, kv_heads, _ = kc.shape
    assert num_heads % kv_heads == 0, "num_heads must be a multiple of num_kv_heads"
    assert q.stride(-1) == 1
    out = torch.empty_like(q)
    if num_seqs == 0:
        return out
    int8 = k_scales is not None
    if int8:
        ks, vs = _blocks_first(k_scales, heads_first), _blocks_first(v_scales, heads_first)
        assert ks.shape == kc.shape[:3] and vs.stride() == ks.stride(), "scales: one per (block, slot, head)"
        scale_strides = ks.stride()
    else:
        ks = vs = seq_lens  # placeholders, never read
        scale_strides = (0, 0, 0)
    group = num_heads // kv_heads
    _decode_kernel[(num_seqs, kv_heads)](
        q, kc, vc, ks, vs, block_tables, seq_lens, out, scale,
        q.stride(0), q.stride(1), kc.stride(0), kc.stride(1), kc.stride(2), *scale_strides,
        block_tables.stride(0), out.stride(0), out.stride(1), block_size,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_G=_pow2(group), BLOCK_D=_pow2(head_dim),
        BLOCK_N=64, KV_INT8=int8, UPCAST=_upcast(q.dtype))
    return out


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           heads_first: bool = False) -> torch.Tensor:
    """One query per sequence against its cached keys (flash-decoding style online softmax).

    ``q`` ``[D, H, d]``; caches ``[num_blocks, block_size, KVH, d]`` (or heads first, see the module
    docstring); H is a multiple of KVH and query head ``h`` uses kv head ``h // (H // KVH)``.
    ``block_tables`` ``[D, max_blocks]`` int32/int64 (entries past a sequence's length are never read);
    ``seq_lens`` ``[D]`` counts keys including the current token, which must already be in the cache.
    One program per (sequence, kv head) serves all of that head's query heads. Returns ``[D, H, d]``
    in ``q.dtype``; a zero-length sequence gives zeros.
    """
    return _decode(q, k_cache, v_cache, None, None, block_tables, seq_lens, scale, heads_first)


def paged_decode_attention_int8kv(q: torch.Tensor, k_cache_int8: torch.Tensor, v_cache_int8: torch.Tensor,
                                  k_scales: torch.Tensor, v_scales: torch.Tensor, block_tables: torch.Tensor,
                                  seq_lens: torch.Tensor, scale: float,
                                  heads_first: bool = False) -> torch.Tensor:
    """:func:`paged_decode_attention` over int8 caches with fp32 per-(block, slot, kv head) scales.

    Scales are shaped like the cache minus head_dim. Equal to the float kernel on
    ``dequantize_kv_int8(cache, scales)``; the per-token scales are applied to score and probability
    columns instead of to every K/V element.
    """
    assert k_cache_int8.dtype == v_cache_int8.dtype == torch.int8
    return _decode(q, k_cache_int8, v_cache_int8, k_scales, v_scales, block_tables, seq_lens, scale,
                   heads_first)


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor, heads_first: bool = False) -> None:
    """Store ``k``/``v`` ``[T, KVH, d]`` at ``slot_mapping [T]`` (negative slot = padding, skipped)."""
    num_tokens, kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    kc, vc = _cache_views(k_cache, v_cache, heads_first)
    assert k.stride(-1) == v.stride(-1) == 1
    _write_kv_kernel[(num_tokens,)](
        k, v, kc, vc, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kc.stride(0), kc.stride(1), kc.stride(2), kc.shape[1],
        KV_HEADS=kv_heads, HEAD_DIM=head_dim, BLOCK_H=triton.next_power_of_2(kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim))


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, slot_mapping: torch.Tensor, cu_seqlens_q: torch.Tensor,
                      context_lens: torch.Tensor, block_tables: torch.Tensor, scale: float,
                      max_query_len: int | None = None, heads_first: bool = False) -> torch.Tensor:
    """Write this step's K/V into the cache, then causal attention of each query chunk over its context.

    ``q`` ``[T, H, d]`` and ``k``/``v`` ``[T, KVH, d]`` are the flattened chunks of S sequences;
    sequence ``i`` owns tokens ``[cu_seqlens_q[i], cu_seqlens_q[i+1])`` (``cu_seqlens_q`` ``[S+1]``,
    starting at 0), and its ``context_lens[i]`` counts cached prefix + this chunk, so the chunk holds
    positions ``[context_lens[i] - q_len, context_lens[i])``. ``block_tables`` ``[S, max_blocks]`` covers
    the whole context. Two launches: :func:`write_kv_cache`, then an attention kernel (one program per
    query tile, sequence and query head) that reads every key, prefix and new, from the cache. A chunk
    of length 1 is a decode, so mixed batches work too. ``max_query_len`` sizes the grid; pass it to
    avoid a device->host sync. Returns ``[T, H, d]`` in ``q.dtype``.
    """
    num_tokens, num_heads, head_dim = q.shape
    write_kv_cache(k, v, k_cache, v_cache, slot_mapping, heads_first)
    kc, vc = _cache_views(k_cache, v_cache, heads_first)
    _, block_size, kv_heads, _ = kc.shape
    assert num_heads % kv_heads == 0, "num_heads must be a multiple of num_kv_heads"
    assert q.stride(-1) == 1
    out = torch.empty_like(q)
    num_seqs = cu_seqlens_q.numel() - 1
    if num_tokens == 0 or num_seqs == 0:
        return out
    if max_query_len is None:
        max_query_len = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    block_m = 64 if max_query_len > 16 else 16
    grid = (triton.cdiv(max_query_len, block_m), num_seqs, num_heads)
    _prefill_kernel[grid](
        q, kc, vc, cu_seqlens_q, context_lens, block_tables, out, scale,
        q.stride(0), q.stride(1), kc.stride(0), kc.stride(1), kc.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1), block_size,
        GROUP=num_heads // kv_heads, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_D=_pow2(head_dim),
        BLOCK_N=64, UPCAST=_upcast(q.dtype))
    return out
