"""Paged decode attention (one query per sequence) as Triton kernels, single pass or split-KV.

Import these through :mod:`kubeinfer.worker.kernels.triton_attention`, the stable surface; this module
also holds the jit helpers and host checks that the prefill kernel there shares.

Cache layout: K and V are each ``[num_kv_heads, num_blocks, block_size, head_dim]`` with
``heads_first=True`` (the engine's layout on every backend, where one head's block is contiguous), or
``[num_blocks, block_size, num_kv_heads, head_dim]`` ("blocks first", the default of the functions).
The kernels only use strides, so both work; ``head_dim`` must be contiguous and K and V must share
strides. Token slot ``s`` lives at block ``s // block_size``, offset ``s % block_size``;
``block_tables[i, j]`` is the cache block holding tokens ``[j * block_size, (j + 1) * block_size)`` of
sequence ``i``. Keys are walked in tiles of ``BLOCK_N`` positions and each position finds its block
through the block table, so ``block_size`` is free (any value) and the tile stays large for ``tl.dot``.

int8 KV: int8 caches shaped like the float ones plus fp32 scales shaped like the cache minus head_dim
(``[kv_heads, num_blocks, block_size]`` heads first): one symmetric scale per (token, kv head), so
``K[..., :] = k_int8[..., :] * k_scales[...]`` (same for V); the format of
:func:`kubeinfer.worker.kernels.attention.quantize_kv_int8`. A token's scale is constant over the
head_dim sums, so the kernels apply the K scales to score columns and the V scales to probability
columns instead of dequantizing every element.

Split-KV (flash-decoding): one program per (sequence, kv head) leaves most SMs idle when few sequences
decode long contexts, so :func:`paged_decode_attention` can instead cut each sequence into partitions of
``DECODE_PARTITION_SIZE`` positions, one program per (sequence, kv head, partition), each writing an
unnormalised partial (running max, exp-sum, weighted V sum) to a workspace that a second kernel
combines. The partition count comes from the host integer ``max_seq_len``, never from device data, so
both launches have fixed grids and can be captured in a CUDA graph; programs whose partition starts at
or past their sequence's length write nothing, and the combine kernel reads only the partitions that
hold keys.
"""

from __future__ import annotations

import functools

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: importing works, the kernels do not exist
    triton = None

_INTERPRET = triton is not None and bool(triton.knobs.runtime.interpret)

# Positions per split-KV partition: a multiple of the key tile. Large enough that a partition's loads
# dwarf its partial's write and the combine step; small enough that a 4k context gives 8 programs per
# (sequence, kv head). Tests lower it to exercise the split on small caches.
DECODE_PARTITION_SIZE = 512
_BLOCK_N = 64      # key positions per tile
_BLOCK_P = 32      # partials combined per step of the reduce kernel
_DEFAULT_SMS = 132  # an H100's SM count, for the host decision when no CUDA device is there (interpreter)


if triton is not None:

    @triton.jit
    def _load_kv_tile(k_ptr, v_ptr, bt_ptr, seq, stride_bt, kvh, stride_kb, stride_ks, stride_kh, block_size,
                      pos, nmask, offs_d, dmask):
        # Each key position finds its block through the block table: block_size need not match the tile.
        blk = tl.load(bt_ptr + seq * stride_bt + pos // block_size, mask=nmask, other=0).to(tl.int64)
        slot = blk * stride_kb + (pos % block_size) * stride_ks + kvh * stride_kh
        kvmask = nmask[:, None] & dmask[None, :]
        k = tl.load(k_ptr + slot[:, None] + offs_d[None, :], mask=kvmask, other=0)
        v = tl.load(v_ptr + slot[:, None] + offs_d[None, :], mask=kvmask, other=0)
        return blk, k, v

    @triton.jit
    def _attend_tile(q, k, v, ks_ptr, vs_ptr, blk, pos, block_size, kvh, stride_sb, stride_ss, stride_sh,
                     valid, nmask, scale, m, l, acc, KV_INT8: tl.constexpr, UPCAST: tl.constexpr):
        """One online-softmax step: rows of ``q`` over one key tile; ``valid`` [rows, keys] masks scores."""
        if KV_INT8:
            srow = blk * stride_sb + (pos % block_size) * stride_ss + kvh * stride_sh
            k_s = tl.load(ks_ptr + srow, mask=nmask, other=0.0)
            v_s = tl.load(vs_ptr + srow, mask=nmask, other=0.0)
            # int8 -> fp16/bf16 is exact, so the tensor-core dot loses nothing.
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
        s = tl.where(valid, s * scale, float("-inf"))
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
        return m_new, l, acc

    @triton.jit
    def _decode_kernel(q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, bt_ptr, lens_ptr, out_ptr, ml_ptr, part_ptr, scale,
                       stride_qt, stride_qh, stride_kb, stride_ks, stride_kh,
                       stride_sb, stride_ss, stride_sh, stride_bt, stride_ot, stride_oh, block_size,
                       num_heads, num_parts,
                       GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr,
                       BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PARTITION: tl.constexpr,
                       SPLIT: tl.constexpr, KV_INT8: tl.constexpr, UPCAST: tl.constexpr):
        # One program per (sequence, kv head[, partition]): all GROUP query heads sharing the kv head are
        # rows of one tile, so each K/V element is read once. Rows are padded to BLOCK_G >= 16 for tl.dot.
        seq = tl.program_id(0)
        kvh = tl.program_id(1).to(tl.int64)  # heads-first caches: kvh * stride can pass 2**31
        seq_len = tl.load(lens_ptr + seq)
        if SPLIT:
            start = tl.program_id(2) * PARTITION
            end = tl.minimum(start + PARTITION, seq_len)
        else:
            start = 0
            end = seq_len
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
        for tile in range(start, end, BLOCK_N):
            pos = tile + offs_n
            nmask = pos < end
            blk, k, v = _load_kv_tile(k_ptr, v_ptr, bt_ptr, seq, stride_bt, kvh, stride_kb, stride_ks,
                                      stride_kh, block_size, pos, nmask, offs_d, dmask)
            m, l, acc = _attend_tile(q, k, v, ks_ptr, vs_ptr, blk, pos, block_size, kvh, stride_sb,
                                     stride_ss, stride_sh, nmask[None, :], nmask, scale, m, l, acc,
                                     KV_INT8, UPCAST)
        omask = gmask[:, None] & dmask[None, :]
        if SPLIT:
            # A program whose partition starts at or past the end ran no tile: it writes nothing, and
            # the combine kernel never reads its rows.
            gmask = tl.where(start < end, gmask, False)  # not `&`: see triton_attention's write kernel
            omask = tl.where(start < end, omask, False)
            # Unnormalised partial of rows (seq, head, partition): the reduce kernel rescales them.
            row = (seq * num_heads + heads) * num_parts + tl.program_id(2)
            tl.store(ml_ptr + 2 * row, m, mask=gmask)
            tl.store(ml_ptr + 2 * row + 1, l, mask=gmask)
            tl.store(part_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=omask)
        else:
            out = acc / tl.where(l > 0, l, 1.0)[:, None]  # empty sequence -> zeros
            tl.store(out_ptr + seq * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=omask)

    @triton.jit
    def _combine_kernel(ml_ptr, part_ptr, lens_ptr, out_ptr, stride_ot, stride_oh, num_heads, num_parts,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
                        PARTITION: tl.constexpr):
        # One program per (sequence, query head): merges the partials of the partitions holding keys.
        seq = tl.program_id(0)
        head = tl.program_id(1)
        used = tl.cdiv(tl.load(lens_ptr + seq), PARTITION)
        offs_p = tl.arange(0, BLOCK_P)
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < HEAD_DIM
        base = (seq * num_heads + head).to(tl.int64) * num_parts
        m = tl.full((1,), -1e30, dtype=tl.float32)
        l = tl.zeros((1,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for p0 in range(0, used, BLOCK_P):
            p = p0 + offs_p
            pmask = p < used
            m_p = tl.load(ml_ptr + 2 * (base + p), mask=pmask, other=-1e30)
            l_p = tl.load(ml_ptr + 2 * (base + p) + 1, mask=pmask, other=0.0)
            a_p = tl.load(part_ptr + (base + p)[:, None] * HEAD_DIM + offs_d[None, :],
                          mask=pmask[:, None] & dmask[None, :], other=0.0)
            m_new = tl.maximum(m, tl.max(m_p, axis=0))
            w = tl.where(pmask, tl.exp(m_p - m_new), 0.0)
            alpha = tl.exp(m - m_new)
            l = l * alpha + tl.sum(w * l_p, axis=0)
            acc = acc * alpha + tl.sum(w[:, None] * a_p, axis=0)
            m = m_new
        out = acc / tl.where(l > 0, l, 1.0)  # no partition (empty sequence) -> zeros
        tl.store(out_ptr + seq * stride_ot + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty),
                 mask=dmask)


def upcast(dtype: torch.dtype) -> bool:
    """Whether a kernel computes in fp32: fp32 inputs get an exact fp32 dot (no tf32); bf16 is upcast in
    the interpreter, whose bf16 arithmetic is wrong (triton issue 11584)."""
    return dtype == torch.float32 or (_INTERPRET and dtype == torch.bfloat16)


def pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))


def blocks_first(cache: torch.Tensor, heads_first: bool) -> torch.Tensor:
    """A ``[num_blocks, block_size, kv_heads, ...]`` view of a cache or of its scales (no copy)."""
    if not heads_first:
        return cache
    return cache.permute(1, 2, 0, 3) if cache.dim() == 4 else cache.permute(1, 2, 0)


def cache_views(k_cache: torch.Tensor, v_cache: torch.Tensor, heads_first: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
    kc, vc = blocks_first(k_cache, heads_first), blocks_first(v_cache, heads_first)
    # One set of strides is passed for both caches.
    assert kc.stride(-1) == 1 and vc.stride() == kc.stride(), "K and V caches need one layout, d contiguous"
    assert kc.dtype == vc.dtype, "K and V caches need one dtype"
    return kc, vc


def scale_views(kc: torch.Tensor, k_scales: torch.Tensor | None, v_scales: torch.Tensor | None,
                heads_first: bool, placeholder: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int]]:
    """Blocks-first views of the int8 scales and their strides; with no scales, a placeholder tensor
    that the kernels never read (they are specialised on KV_INT8)."""
    if k_scales is None and v_scales is None:
        assert kc.dtype != torch.int8, "an int8 cache needs k_scales and v_scales"
        return placeholder, placeholder, (0, 0, 0)
    assert k_scales is not None and v_scales is not None, "pass both k_scales and v_scales"
    assert kc.dtype == torch.int8, f"scales are for an int8 cache, got a {kc.dtype} cache"
    ks, vs = blocks_first(k_scales, heads_first), blocks_first(v_scales, heads_first)
    assert ks.dtype == vs.dtype == torch.float32, "KV scales are fp32"
    assert ks.shape == vs.shape == kc.shape[:3] and vs.stride() == ks.stride(), \
        "scales: one per (block, slot, kv head), K and V scales in one layout"
    return ks, vs, ks.stride()


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return _DEFAULT_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def decode_partitions(num_seqs: int, kv_heads: int, max_seq_len: int | None,
                      device: torch.device | str = "cuda") -> int:
    """How many partitions :func:`paged_decode_attention` splits each sequence into (1 = single pass).

    Split when one program per (sequence, kv head) fills fewer than the device's SMs and
    ``max_seq_len`` exceeds one partition: then ``ceil(max_seq_len / DECODE_PARTITION_SIZE)``. A host
    decision from host integers only, so a captured CUDA graph keeps its grids.
    """
    if max_seq_len is None or max_seq_len <= DECODE_PARTITION_SIZE:
        return 1
    if num_seqs * kv_heads >= _sm_count(torch.device(device)):
        return 1
    return triton.cdiv(max_seq_len, DECODE_PARTITION_SIZE)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           heads_first: bool = False, k_scales: torch.Tensor | None = None,
                           v_scales: torch.Tensor | None = None,
                           max_seq_len: int | None = None) -> torch.Tensor:
    """One query per sequence against its cached keys (online softmax); returns ``[D, H, d]`` in q's dtype.

    ``q`` ``[D, H, d]`` (d contiguous); caches as in the module docstring, float of any dtype, or int8
    with ``k_scales``/``v_scales`` fp32 (both or neither). H is a multiple of KVH and query head ``h``
    uses kv head ``h // (H // KVH)``. ``block_tables`` ``[D, max_blocks]`` int32/int64 (entries past a
    sequence's length are never read); ``seq_lens`` ``[D]`` counts keys including the current token,
    which must already be in the cache. A zero-length sequence (a padding row) gives zeros.

    ``max_seq_len``: a host integer >= every ``seq_lens`` entry (in a CUDA graph, the engine's
    max_model_len), or None. With it, :func:`decode_partitions` may choose the split-KV path (two
    launches and an fp32 workspace of ``D * H * partitions * (d + 2)`` floats); None keeps the single
    pass, one program per (sequence, kv head). No host sync either way.
    """
    num_seqs, num_heads, head_dim = q.shape
    kc, vc = cache_views(k_cache, v_cache, heads_first)
    _, block_size, kv_heads, _ = kc.shape
    assert kc.shape[-1] == head_dim, f"cache head_dim {kc.shape[-1]} != q head_dim {head_dim}"
    assert num_heads % kv_heads == 0, "num_heads must be a multiple of num_kv_heads"
    assert q.stride(-1) == 1
    assert block_tables.shape[0] == seq_lens.shape[0] == num_seqs
    ks, vs, scale_strides = scale_views(kc, k_scales, v_scales, heads_first, seq_lens)
    out = torch.empty_like(q)
    if num_seqs == 0:
        return out
    group = num_heads // kv_heads
    parts = decode_partitions(num_seqs, kv_heads, max_seq_len, q.device)
    split = parts > 1
    block_n = min(_BLOCK_N, DECODE_PARTITION_SIZE)
    assert DECODE_PARTITION_SIZE % block_n == 0 and block_n >= 16
    if split:
        ml = torch.empty(num_seqs, num_heads, parts, 2, dtype=torch.float32, device=q.device)
        partials = torch.empty(num_seqs, num_heads, parts, head_dim, dtype=torch.float32, device=q.device)
    else:
        ml = partials = out  # never touched by the single-pass kernel
    block_d = pow2(head_dim)
    _decode_kernel[(num_seqs, kv_heads, parts)](
        q, kc, vc, ks, vs, block_tables, seq_lens, out, ml, partials, scale,
        q.stride(0), q.stride(1), kc.stride(0), kc.stride(1), kc.stride(2), *scale_strides,
        block_tables.stride(0), out.stride(0), out.stride(1), block_size, num_heads, parts,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_G=pow2(group), BLOCK_D=block_d, BLOCK_N=block_n,
        PARTITION=DECODE_PARTITION_SIZE, SPLIT=split, KV_INT8=k_scales is not None, UPCAST=upcast(q.dtype),
        # head_dim 128 on 4 warps needs > 255 registers a thread (ptxas spills, sm_90); 8 warps do not.
        num_warps=8 if block_d >= 128 else 4, num_stages=2)
    if split:
        _combine_kernel[(num_seqs, num_heads)](
            ml, partials, seq_lens, out, out.stride(0), out.stride(1), num_heads, parts,
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_P=_BLOCK_P, PARTITION=DECODE_PARTITION_SIZE,
            num_warps=2)
    return out
