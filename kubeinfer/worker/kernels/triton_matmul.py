"""Weight-only quantized matmuls (W8A16, W4A16) as Triton kernels, on the engine's one quantized format.

The weight states are those of :mod:`kubeinfer.worker.quant` (its module docstring is the contract;
``quant.get_scheme(...).quantize`` / ``.dequantize`` are the one quantizer and reference):

* int8 (``Int8WeightOnly``): ``qweight`` int8 ``[N, K]`` (the ``nn.Linear`` orientation), ``scales``
  ``[N]`` any float dtype; ``W[n, k] = qweight[n, k] * scales[n]``.
* int4 (``Int4WeightOnly``): ``qweight`` uint8 ``[N, K // 2]``, two values per byte along K (low nibble
  = even k, values 0..15); ``scales`` and ``mins`` ``[N, K // G]`` (fp16 in the state, any float dtype
  here, same strides); ``W[n, k] = q[n, k] * scales[n, k // G] + mins[n, k // G]``.

Both kernels dequantize a weight tile in registers and accumulate ``x @ W.T`` in fp32. Decode-sized
inputs (M <= 16) use split-K when the N tiles alone would leave the SMs idle: each program covers a
slice of K and writes an fp32 partial, and a second kernel sums the partials (a fixed order, so
results are deterministic). Launch choices depend on host shapes only, so both paths can be captured in
a CUDA graph.
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
_DEFAULT_SMS = 132  # an H100's SM count, for the host decision when no CUDA device is there (interpreter)
_MAX_SPLIT_K = 16


if triton is not None:

    @triton.jit
    def _store_tile(acc, out_ptr, ws_ptr, offs_m, offs_n, M, N, SPLIT: tl.constexpr):
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        if SPLIT:  # fp32 partial of this K slice: [SPLIT_K, M, N]
            ws = ws_ptr + tl.program_id(2).to(tl.int64) * M * N
            tl.store(ws + offs_m[:, None] * N + offs_n[None, :], acc, mask=mask)
        else:
            tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _w8a16_kernel(x_ptr, w_ptr, s_ptr, out_ptr, ws_ptr, M, N, K, k_per_split,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      SPLIT: tl.constexpr, UPCAST: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        k_begin = tl.program_id(2) * k_per_split
        k_end = tl.minimum(k_begin + k_per_split, K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_begin, k_end, BLOCK_K):
            kk = k0 + offs_k
            kmask = kk < k_end
            x = tl.load(x_ptr + offs_m[:, None] * K + kk[None, :],
                        mask=(offs_m[:, None] < M) & kmask[None, :], other=0.0)
            # [BLOCK_K, BLOCK_N] view of the [N, K] weight, so the dot needs no transpose.
            q = tl.load(w_ptr + offs_n[None, :].to(tl.int64) * K + kk[:, None],
                        mask=(offs_n[None, :] < N) & kmask[:, None], other=0)
            if UPCAST:
                acc += tl.dot(x.to(tl.float32), q.to(tl.float32), input_precision="ieee")
            else:
                # int8 -> fp16/bf16 is exact, so the tensor-core dot loses nothing.
                acc += tl.dot(x, q.to(x.dtype))
        # The scale is per output channel, so it factors out of the K sum (and of each K slice's).
        scale = tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        _store_tile(acc * scale[None, :], out_ptr, ws_ptr, offs_m, offs_n, M, N, SPLIT)

    @triton.jit
    def _w4a16_kernel(x_ptr, w_ptr, s_ptr, mins_ptr, out_ptr, ws_ptr, M, N, K, k_per_split, stride_sn, stride_sg,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      SPLIT: tl.constexpr, UPCAST: tl.constexpr):
        # BLOCK_K is the group size and K slices start on group boundaries, so each K tile is one
        # quantization group: one scale and one min per output column, loaded once per tile.
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        nmask = offs_n < N
        half_k = K // 2
        k_begin = tl.program_id(2) * k_per_split
        k_end = tl.minimum(k_begin + k_per_split, K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_begin, k_end, BLOCK_K):
            kk = k0 + offs_k
            x = tl.load(x_ptr + offs_m[:, None] * K + kk[None, :], mask=offs_m[:, None] < M, other=0.0)
            # Each byte is loaded for both of its k's (same address, so no extra traffic) and the
            # nibble picked by k's parity: simpler than join/reshape, and fine in the interpreter.
            packed = tl.load(w_ptr + offs_n[None, :].to(tl.int64) * half_k + (kk[:, None] >> 1),
                             mask=nmask[None, :], other=0)
            q = ((packed >> ((kk[:, None] & 1) * 4)) & 0xF).to(tl.float32)
            g_off = offs_n * stride_sn + (k0 // BLOCK_K) * stride_sg
            s = tl.load(s_ptr + g_off, mask=nmask, other=0.0).to(tl.float32)
            mn = tl.load(mins_ptr + g_off, mask=nmask, other=0.0).to(tl.float32)
            w = q * s[None, :] + mn[None, :]  # [BLOCK_K, BLOCK_N]
            if UPCAST:
                acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
            else:
                acc += tl.dot(x, w.to(x.dtype))
        _store_tile(acc, out_ptr, ws_ptr, offs_m, offs_n, M, N, SPLIT)

    @triton.jit
    def _sum_splits_kernel(ws_ptr, out_ptr, numel, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for i in tl.static_range(SPLIT_K):
            acc += tl.load(ws_ptr + i * numel + offs, mask=mask, other=0.0)
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _upcast(dtype: torch.dtype) -> bool:
    # fp32 activations get an exact fp32 dot (no tf32); bf16 is upcast in the interpreter, whose bf16
    # arithmetic is wrong (triton issue 11584).
    return dtype == torch.float32 or (_INTERPRET and dtype == torch.bfloat16)


def _blocks(m: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K) for ``m`` rows; tl.dot needs every dim >= 16."""
    if _INTERPRET:  # interpreter cost is per program and loop step, not per element
        return 16 if m <= 16 else 64, 64, 128
    if m <= 16:  # decode: memory bound, narrow N tiles (and split-K) to spread the weight over the SMs
        return 16, 64, 128
    return (32, 64, 64) if m <= 32 else (64, 128, 64)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return _DEFAULT_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_k(m: int, n: int, k: int, device: torch.device | str = "cuda") -> int:
    """K slices a W8A16/W4A16 launch uses for ``[m, k] @ [k, n]`` (1 = no split).

    Only for decode-sized ``m`` (<= 16), when the ``(m, n)`` tiles are fewer than twice the SMs: then
    as many slices as fill them, at most one per K tile and ``_MAX_SPLIT_K``.
    """
    bm, bn, bk = _blocks(m)
    if m > 16:
        return 1
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    want = 2 * _sm_count(torch.device(device)) // tiles
    split = max(1, min(want, triton.cdiv(k, bk), _MAX_SPLIT_K))
    # Every slice a whole number of K tiles, and no empty slice.
    per = triton.cdiv(triton.cdiv(k, bk), split) * bk
    return triton.cdiv(k, per)


def _check_x(x: torch.Tensor, k: int) -> torch.Tensor:
    assert x.shape[-1] == k, f"x has K={x.shape[-1]}, the weight K={k}"
    assert x.dtype in (torch.float16, torch.bfloat16, torch.float32), x.dtype
    return x.reshape(-1, k).contiguous()


def _launch(kernel, x: torch.Tensor, n: int, k: int, weights: tuple, extra: tuple = (),
            block_k: int | None = None) -> torch.Tensor:
    """Run ``kernel`` over ``x [..., K]`` for an ``[N, K]`` weight, split-K when :func:`split_k` says.
    ``block_k`` overrides the K tile (W4A16: the group size, which must divide the slices)."""
    x2 = _check_x(x, k)
    m = x2.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out.view(*x.shape[:-1], n)
    bm, bn, bk = _blocks(m)
    splits = split_k(m, n, k, x.device)
    per = triton.cdiv(triton.cdiv(k, bk), splits) * bk
    if block_k is not None:
        assert per % block_k == 0 or splits == 1, "K slices must hold whole groups"
        bk = block_k
    ws = torch.empty((splits, m, n), dtype=torch.float32, device=x.device) if splits > 1 else out
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn), splits)
    kernel[grid](x2, *weights, out, ws, m, n, k, per, *extra,
                 BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT=splits > 1, UPCAST=_upcast(x.dtype),
                 num_warps=4, num_stages=3 if m <= 16 else 2)
    if splits > 1:
        block = 1024
        _sum_splits_kernel[(triton.cdiv(m * n, block),)](ws, out, m * n, SPLIT_K=splits, BLOCK=block,
                                                         num_warps=4)
    return out.view(*x.shape[:-1], n)


def w8a16_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x @ (qweight * scales[:, None]).T`` with int8 weights dequantized in registers.

    ``x`` is ``[..., K]`` fp16/bf16/fp32; ``qweight`` int8 ``[N, K]``; ``scales`` ``[N]`` (any float
    dtype). Accumulates in fp32 and returns ``[..., N]`` in ``x.dtype``. Any N and K (tails are masked).
    """
    n, k = qweight.shape
    assert qweight.dtype == torch.int8 and scales.shape == (n,)
    return _launch(_w8a16_kernel, x, n, k, (qweight.contiguous(), scales.contiguous()))


def w4a16_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                 group_size: int) -> torch.Tensor:
    """``x @ W.T`` with the ``quant.Int4WeightOnly`` weight ``W = q * scales + mins`` dequantized in registers.

    ``x`` is ``[..., K]`` fp16/bf16/fp32; ``qweight`` uint8 ``[N, K // 2]`` (low nibble = even k);
    ``scales``/``mins`` ``[N, K // group_size]`` (any float dtype, same strides),
    ``W[n, k] = q[n, k] * scales[n, k // G] + mins[n, k // G]``. K must be a multiple of ``group_size``
    (so even). Accumulates in fp32; returns ``[..., N]`` in ``x.dtype``.
    """
    n, half_k = qweight.shape
    k = 2 * half_k
    assert qweight.dtype == torch.uint8
    assert k % group_size == 0, f"K={k} is not a multiple of group_size={group_size}"
    want = (n, k // group_size)
    assert scales.shape == mins.shape == want, (scales.shape, mins.shape, want)
    assert scales.stride() == mins.stride(), "scales and mins need one layout"
    assert group_size >= 16 and group_size & (group_size - 1) == 0, "group_size: a power of two >= 16"
    return _launch(_w4a16_kernel, x, n, k, (qweight.contiguous(), scales, mins), extra=scales.stride(),
                   block_k=group_size)


