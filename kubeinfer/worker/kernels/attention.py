"""Attention over the paged KV cache, torch implementation (CPU, and the reference for other kernels).

Cache layout per layer (CPU): ``[num_kv_heads, num_blocks, block_size, head_dim]`` for K and for V;
token slot ``s`` lives at block ``s // block_size``, offset ``s % block_size``. Heads outermost means a
gather through a block table yields ``[kv_heads, seqs, tokens, head_dim]`` with the (head, seq) batch
dims collapsible, so the score matmul reads the gathered keys in place instead of copying them again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch


class LayerKVCache(NamedTuple):
    """One layer's paged K and V. With an int8 cache, ``k``/``v`` are int8 and ``k_scale``/``v_scale``
    hold one fp32 scale per (kv head, block, slot), ``[kv_heads, num_blocks, block_size]``: a token is
    quantized once, when written, so a filling block never needs requantizing."""

    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None


def quantize_kv_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 over the last dim: ``x [..., d]`` -> ``(int8 [..., d], fp32 scales [...])``.

    The Triton int8-KV kernels read the same format.
    """
    scales = x.float().abs().amax(dim=-1).clamp_min(1e-8) / 127.0
    q = torch.round(x.float() / scales[..., None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


@dataclass
class PrefillChunk:
    """One sequence's prefill chunk inside the flattened batch: tokens ``[start, end)``.

    ``block_table`` covers the whole context (cached prefix + this chunk); ``mask`` is None when
    the chunk starts at position 0, so plain causal attention over the chunk's own K/V suffices.
    """

    start: int
    end: int
    context_len: int
    block_table: torch.Tensor
    mask: torch.Tensor | None


@dataclass
class AttentionMetadata:
    """Per-step inputs to attention, built once per step and shared by every layer.

    The first ``num_decode_tokens`` tokens of the batch are decodes (one query per sequence), with
    ``decode_block_tables`` ``[D, max_blocks]`` and ``decode_mask`` ``[1, D, 1, max_blocks*block_size]``
    (True where a key is padding, i.e. past the end of that sequence). The remaining tokens are the
    ``prefills``. Each kernel backend fills the fields its kernels read (kernels/*_backend.py): the
    C++ decode kernel reads ``decode_context_lens`` ``[D]`` instead of the mask; the Triton kernels
    read the batch as query chunks (``cu_seqlens_q``, ``context_lens``, ``block_tables``) and, for a
    step of decodes only, ``max_seq_len``: a host bound on any context, which sizes the split-KV grid
    without reading the device (fixed for a CUDA graph).
    """

    slot_mapping: torch.Tensor
    num_decode_tokens: int
    decode_block_tables: torch.Tensor | None
    decode_mask: torch.Tensor | None
    prefills: list[PrefillChunk]
    key_workspace: torch.Tensor | None = None     # flat buffers reused by every layer's gathers
    value_workspace: torch.Tensor | None = None
    decode_context_lens: torch.Tensor | None = None  # [D] int64, for the cpp decode kernel
    # The Triton path takes the whole batch as query chunks (a decode is a chunk of one):
    cu_seqlens_q: torch.Tensor | None = None      # [S+1] chunk boundaries in the flattened batch
    context_lens: torch.Tensor | None = None      # [S] cached prefix + this chunk
    block_tables: torch.Tensor | None = None      # [S, max_blocks]
    max_query_len: int = 0
    max_seq_len: int | None = None

    @property
    def decode_only(self) -> bool:
        return not self.prefills


def write_kv(cache: LayerKVCache, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store this step's keys and values ``[T, kv_heads, head_dim]`` at their slots."""
    kvh, _, _, d = cache.k.shape
    if cache.k_scale is None:
        cache.k.view(kvh, -1, d).index_copy_(1, slot_mapping, k.transpose(0, 1))
        cache.v.view(kvh, -1, d).index_copy_(1, slot_mapping, v.transpose(0, 1))
        return
    for dst, scale_dst, x in ((cache.k, cache.k_scale, k), (cache.v, cache.v_scale, v)):
        q, scales = quantize_kv_int8(x)
        dst.view(kvh, -1, d).index_copy_(1, slot_mapping, q.transpose(0, 1))
        scale_dst.view(kvh, -1).index_copy_(1, slot_mapping, scales.t())


def _gather(cache: torch.Tensor, block_table: torch.Tensor, out: torch.Tensor | None = None,
            scales: torch.Tensor | None = None) -> torch.Tensor:
    """Block ids ``[S, nb]`` (or ``[nb]``) -> ``[kv_heads, S, nb*block_size, head_dim]`` (or without S).

    ``out``, if given, is a flat float buffer with room for the result: reusing it avoids a fresh
    large allocation per layer, whose page faults cost more than the copy itself on some VMs. With
    ``scales`` (an int8 cache) the gathered blocks are dequantized into it.
    """
    kvh, _, bs, d = cache.shape
    ids = block_table.reshape(-1)
    shape = (kvh, *block_table.shape[:-1], block_table.shape[-1] * bs, d)
    if out is not None:
        out = out[: kvh * ids.numel() * bs * d].view(kvh, ids.numel(), bs, d)
    if scales is not None:
        q = cache.index_select(1, ids)
        s = scales.index_select(1, ids).unsqueeze(-1)
        g = torch.mul(q, s, out=out) if out is not None else q * s
        return g.view(shape)
    # index_select writes a contiguous result; advanced indexing on dim 1 would need another copy.
    g = torch.index_select(cache, 1, ids, out=out) if out is not None else cache.index_select(1, ids)
    return g.view(shape)


def gather_workspace_size(cache: torch.Tensor, num_blocks: int) -> int:
    """Elements one ``_gather`` of ``num_blocks`` blocks needs."""
    kvh, _, bs, d = cache.shape
    return kvh * num_blocks * bs * d


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerKVCache,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Causal attention for a flattened batch; returns ``[T, num_heads, head_dim]``.

    ``q`` is ``[T, heads, d]``; ``k``/``v`` are this step's ``[T, kv_heads, d]`` (already written to
    the cache). Decodes attend through the block tables in one batched matmul; each prefill chunk is
    one SDPA call.
    """
    out = torch.empty_like(q)
    nd = meta.num_decode_tokens
    if nd:
        out[:nd] = decode_attention(q[:nd], cache, meta, scale)
    prefill_attention(q, k, v, cache, meta, scale, out)
    return out


def decode_attention(q: torch.Tensor, cache: LayerKVCache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """One query per sequence ``[D, heads, d]`` against its cached keys, through ``meta``'s decode
    block tables and padding mask. Grouped-query heads are handled by viewing queries as
    ``[kv_heads, group]`` so K/V are never repeated."""
    nd, num_heads, head_dim = q.shape
    kv_heads = cache.k.shape[0]
    group = num_heads // kv_heads
    keys = _gather(cache.k, meta.decode_block_tables, meta.key_workspace, cache.k_scale)  # [kvh, D, L, d]
    values = _gather(cache.v, meta.decode_block_tables, meta.value_workspace, cache.v_scale)
    length = keys.shape[-2]
    # bmm on explicit 3-D views: matmul would copy the transposed keys to fold the batch dims.
    qd = q.reshape(nd, kv_heads, group, head_dim).transpose(0, 1).reshape(-1, group, head_dim)
    scores = torch.bmm(qd, keys.view(-1, length, head_dim).transpose(1, 2))  # [kvh*D, g, L]
    scores = scores.view(kv_heads, nd, group, length).mul_(scale)
    scores.masked_fill_(meta.decode_mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).view(-1, group, length)
    o = torch.bmm(probs, values.view(-1, length, head_dim))                  # [kvh*D, g, d]
    return o.view(kv_heads, nd, group, head_dim).transpose(0, 1).reshape(nd, num_heads, head_dim)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerKVCache,
                      meta: AttentionMetadata, scale: float, out: torch.Tensor) -> None:
    """Each prefill chunk of ``meta`` in one SDPA call, written into its rows of ``out``. A chunk
    starting at position 0 attends to its own K/V without touching the cache."""
    group = q.shape[1] // cache.k.shape[0]
    for chunk in meta.prefills:
        qc = q[chunk.start:chunk.end].transpose(0, 1).unsqueeze(0)                # [1, h, n, d]
        if chunk.mask is None:
            kc = k[chunk.start:chunk.end].transpose(0, 1)
            vc = v[chunk.start:chunk.end].transpose(0, 1)
        else:
            kc = _gather(cache.k, chunk.block_table, meta.key_workspace, cache.k_scale)[:, :chunk.context_len]
            vc = _gather(cache.v, chunk.block_table, meta.value_workspace, cache.v_scale)[:, :chunk.context_len]
        o = torch.nn.functional.scaled_dot_product_attention(
            qc, kc.unsqueeze(0).to(qc.dtype), vc.unsqueeze(0).to(qc.dtype), attn_mask=chunk.mask,
            is_causal=chunk.mask is None, scale=scale, enable_gqa=group > 1)
        out[chunk.start:chunk.end] = o.squeeze(0).transpose(0, 1)
