"""Paged attention as Triton kernels: the KV-cache write, chunked prefill, and (re-exported) decode.

This module is the import surface of the attention kernels: :func:`write_kv_cache`,
:func:`prefill_attention`, :func:`paged_decode_attention` and :func:`decode_partitions` (defined in
:mod:`kubeinfer.worker.kernels.triton_decode`, whose ``DECODE_PARTITION_SIZE`` sets the split-KV
partition; set it there, this module holds no copy) and :func:`triton_available`.

Cache layout (see triton_decode's docstring for the details): per layer, K and V are each
``[num_kv_heads, num_blocks, block_size, head_dim]`` with ``heads_first=True`` (the engine's layout),
or ``[num_blocks, block_size, num_kv_heads, head_dim]`` by default; token slot ``s`` lives at block
``s // block_size``, offset ``s % block_size``; a negative slot marks a padding token, never written.
An int8 cache has int8 K/V of that shape and fp32 scales shaped like the cache minus head_dim, one per
(token, kv head): ``scale = max(amax|x| over head_dim, 1e-8) / 127``, ``q = round(x / scale)`` (half
to even) clamped to [-127, 127] -- :func:`kubeinfer.worker.kernels.attention.quantize_kv_int8`'s
format, bit for bit as torch computes it on the CPU: the write kernel divides with IEEE rounding
(``div_rn``; ``/`` on fp32 is approximate on the GPU). torch on CUDA divides by a Python scalar through
its reciprocal, so a scale it computes there can differ from ours in the last bit.
"""

from __future__ import annotations

import torch

from kubeinfer.worker.kernels.triton_decode import (  # noqa: F401 (re-exported: the stable surface)
    _INTERPRET, cache_views, decode_partitions, paged_decode_attention, pow2, scale_views, triton, upcast)

if triton is not None:
    import triton.language as tl

    from kubeinfer.worker.kernels.triton_decode import _attend_tile, _load_kv_tile


def triton_available(device: torch.device | str | torch.Tensor) -> bool:
    """True when the Triton kernels can run for ``device`` (a CUDA device or tensor, triton importable)."""
    if isinstance(device, torch.Tensor):
        device = device.device
    return triton is not None and torch.device(device).type == "cuda"


if triton is not None:

    @triton.jit
    def _quantize_rows(x, mask):
        """Symmetric int8 of the rows of fp32 ``x`` (masked entries must be 0): ``(int8 q, fp32 scales)``.

        Bit-exact with torch on the CPU: IEEE divisions and an exact round-half-to-even built from
        floor (every step is exact for |y| <= 127), as ``torch.round`` rounds.
        """
        amax = tl.max(tl.abs(x), axis=1)
        scale = tl.math.div_rn(tl.maximum(amax, 1e-8), 127.0)
        y = tl.math.div_rn(x, scale[:, None])
        r = tl.floor(y)
        frac = y - r  # exact: |y| <= 127
        odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
        r = r + ((frac > 0.5) | ((frac == 0.5) & odd)).to(tl.float32)
        q = tl.minimum(tl.maximum(r, -127.0), 127.0)
        return tl.where(mask, q, 0.0).to(tl.int8), scale

    @triton.jit
    def _write_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, slot_ptr, stride_kt, stride_kh,
                         stride_vt, stride_vh, stride_cb, stride_cs, stride_ch, stride_sb, stride_ss,
                         stride_sh, block_size,
                         KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
                         BLOCK_D: tl.constexpr, QUANT: tl.constexpr):
        # One program per token, all of its kv heads: a token's heads are adjacent in k and v.
        t = tl.program_id(0)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        offs_h = tl.arange(0, BLOCK_H).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        # A negative slot marks a padding token. (tl.where, not `&`: the interpreter turns a vector
        # mask `&` a scalar one into integers, which tl.load rejects.)
        hmask = tl.where(slot >= 0, offs_h < KV_HEADS, False)
        mask = hmask[:, None] & (offs_d[None, :] < HEAD_DIM)
        blk, off = slot // block_size, slot % block_size
        dst = blk * stride_cb + off * stride_cs + offs_h[:, None] * stride_ch + offs_d[None, :]
        k = tl.load(k_ptr + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask, other=0.0)
        v = tl.load(v_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask, other=0.0)
        if QUANT:
            kq, k_s = _quantize_rows(k.to(tl.float32), mask)
            vq, v_s = _quantize_rows(v.to(tl.float32), mask)
            tl.store(kc_ptr + dst, kq, mask=mask)
            tl.store(vc_ptr + dst, vq, mask=mask)
            sdst = blk * stride_sb + off * stride_ss + offs_h * stride_sh
            tl.store(ks_ptr + sdst, k_s, mask=hmask)
            tl.store(vs_ptr + sdst, v_s, mask=hmask)
        else:
            tl.store(kc_ptr + dst, k.to(kc_ptr.dtype.element_ty), mask=mask)
            tl.store(vc_ptr + dst, v.to(vc_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _prefill_kernel(q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, cu_ptr, ctx_ptr, bt_ptr, out_ptr, scale,
                        stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_sb, stride_ss,
                        stride_sh, stride_bt, stride_ot, stride_oh, block_size,
                        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, KV_INT8: tl.constexpr,
                        UPCAST: tl.constexpr):
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
            causal = nmask[None, :] & (pos[None, :] <= q_pos[:, None])
            m, l, acc = _attend_tile(q, k, v, ks_ptr, vs_ptr, blk, pos, block_size, kvh, stride_sb, stride_ss,
                                     stride_sh, causal, nmask, scale, m, l, acc, KV_INT8, UPCAST)
        out = acc / tl.where(l > 0, l, 1.0)[:, None]
        tl.store(out_ptr + (q_start + offs_m)[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=mmask[:, None] & dmask[None, :])


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor, heads_first: bool = False,
                   k_scales: torch.Tensor | None = None, v_scales: torch.Tensor | None = None) -> None:
    """Store ``k``/``v`` ``[T, KVH, d]`` (d contiguous) at ``slot_mapping [T]``; a negative slot is skipped.

    A float cache receives the values cast to its dtype. An int8 cache needs ``k_scales``/``v_scales``
    and receives each (token, kv head) row quantized in the kernel, in the module docstring's format
    (bit-identical to ``quantize_kv_int8`` on the CPU). One launch, no host sync.
    """
    num_tokens, kv_heads, head_dim = k.shape
    kc, vc = cache_views(k_cache, v_cache, heads_first)
    assert kc.shape[2:] == (kv_heads, head_dim), f"k {tuple(k.shape)} does not fit a cache {tuple(kc.shape)}"
    assert v.shape == k.shape and k.stride(-1) == v.stride(-1) == 1
    assert slot_mapping.shape == (num_tokens,)
    ks, vs, scale_strides = scale_views(kc, k_scales, v_scales, heads_first, slot_mapping)
    if num_tokens == 0:
        return
    _write_kv_kernel[(num_tokens,)](
        k, v, kc, vc, ks, vs, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kc.stride(0), kc.stride(1), kc.stride(2), *scale_strides, kc.shape[1],
        KV_HEADS=kv_heads, HEAD_DIM=head_dim, BLOCK_H=triton.next_power_of_2(kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim), QUANT=k_scales is not None,
        num_warps=1 if kv_heads * head_dim <= 1024 else 4)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, slot_mapping: torch.Tensor, cu_seqlens_q: torch.Tensor,
                      context_lens: torch.Tensor, block_tables: torch.Tensor, scale: float,
                      max_query_len: int | None = None, heads_first: bool = False,
                      k_scales: torch.Tensor | None = None,
                      v_scales: torch.Tensor | None = None) -> torch.Tensor:
    """Write this step's K/V into the cache, then causal attention of each query chunk over its context.

    ``q`` ``[T, H, d]`` and ``k``/``v`` ``[T, KVH, d]`` are the flattened chunks of S sequences;
    sequence ``i`` owns tokens ``[cu_seqlens_q[i], cu_seqlens_q[i+1])`` (``cu_seqlens_q`` ``[S+1]``,
    starting at 0), and its ``context_lens[i]`` counts cached prefix + this chunk, so the chunk holds
    positions ``[context_lens[i] - q_len, context_lens[i])``. ``block_tables`` ``[S, max_blocks]`` covers
    the whole context. Two launches: :func:`write_kv_cache`, then an attention kernel (one program per
    query tile, sequence and query head) that reads every key, prefix and new, from the cache -- so with
    an int8 cache (``k_scales``/``v_scales``) the chunk attends to its own keys quantized too. A chunk of
    length 1 is a decode, so mixed batches work. ``max_query_len`` (a host integer >= every chunk's
    length) sizes the grid; pass it to avoid a device->host sync. Returns ``[T, H, d]`` in ``q.dtype``.
    """
    num_tokens, num_heads, head_dim = q.shape
    write_kv_cache(k, v, k_cache, v_cache, slot_mapping, heads_first, k_scales, v_scales)
    kc, vc = cache_views(k_cache, v_cache, heads_first)
    _, block_size, kv_heads, _ = kc.shape
    assert num_heads % kv_heads == 0, "num_heads must be a multiple of num_kv_heads"
    assert q.stride(-1) == 1
    ks, vs, scale_strides = scale_views(kc, k_scales, v_scales, heads_first, context_lens)
    out = torch.empty_like(q)
    num_seqs = cu_seqlens_q.numel() - 1
    if num_tokens == 0 or num_seqs == 0:
        return out
    if max_query_len is None:
        max_query_len = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    block_m = 64 if max_query_len > 16 else 16
    grid = (triton.cdiv(max_query_len, block_m), num_seqs, num_heads)
    _prefill_kernel[grid](
        q, kc, vc, ks, vs, cu_seqlens_q, context_lens, block_tables, out, scale,
        q.stride(0), q.stride(1), kc.stride(0), kc.stride(1), kc.stride(2), *scale_strides,
        block_tables.stride(0), out.stride(0), out.stride(1), block_size,
        GROUP=num_heads // kv_heads, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_D=pow2(head_dim),
        BLOCK_N=64, KV_INT8=k_scales is not None, UPCAST=upcast(q.dtype),
        num_warps=4, num_stages=2)
    return out
