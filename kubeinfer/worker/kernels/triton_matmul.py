"""Weight-only quantized matmuls (int8 per-channel, int4 grouped) as Triton kernels, plus torch references.

Layouts (the CPU path must match them):

* int8: ``qweight`` int8 ``[N, K]`` (the ``nn.Linear`` orientation), ``scales`` ``[N]``; symmetric,
  ``W[n, k] = q[n, k] * scales[n]``.
* int4: ``packed`` uint8 ``[N, K // 2]``, two values per byte along K: byte ``packed[n, j]`` holds
  ``q[n, 2j]`` in its low nibble and ``q[n, 2j + 1]`` in its high nibble; ``q`` is unsigned 0..15.
  ``scales`` and ``zeros`` are float ``[K // G, N]`` (G = ``group_size``), asymmetric:
  ``W[n, k] = (q[n, k] - zeros[k // G, n]) * scales[k // G, n]``. Zeros are floats, so integer
  zero points (GPTQ/AWQ) are exact and a ``d * q + m`` format (GGUF Q4_1) maps to ``zeros = -m / d``.
* int4 with mins (the state of ``kubeinfer.worker.quant.Int4WeightOnly``, GGUF Q4_1's formula): the same
  ``packed``, with ``scales`` and ``mins`` ``[N, K // G]``: ``W[n, k] = q[n, k] * scales[n, g] + mins[n, g]``;
  see :func:`w4a16_matmul_mins`.

The reference functions below need only torch, so the CPU path can import this module without triton.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch references still work
    triton = None

from kubeinfer.worker.quant import pack_int4, unpack_int4  # noqa: E402,F401 (one packing, shared)

_INTERPRET = triton is not None and bool(triton.knobs.runtime.interpret)


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    group_size: int) -> torch.Tensor:
    """Packed int4 ``[N, K // 2]`` + ``scales``/``zeros`` ``[K // G, N]`` -> fp32 ``W [N, K]``."""
    q = unpack_int4(packed).float()
    s = scales.float().t().repeat_interleave(group_size, dim=1)
    z = zeros.float().t().repeat_interleave(group_size, dim=1)
    return (q - z) * s


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """int8 ``[N, K]`` with per-output-channel ``scales [N]`` -> fp32 ``W [N, K]``."""
    return q.float() * scales.float()[:, None]


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 of ``w [N, K]``: returns ``(q int8 [N, K], scales fp32 [N])``."""
    scales = w.float().abs().amax(dim=1).clamp_min(1e-8) / 127.0
    q = torch.round(w.float() / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric grouped int4 of ``w [N, K]``: returns ``(packed, scales, zeros)`` in the layout above."""
    n, k = w.shape
    assert k % group_size == 0, "K must be a multiple of group_size"
    g = w.float().view(n, k // group_size, group_size)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scales = ((hi - lo) / 15.0).clamp_min(1e-8)
    zeros = torch.round(-lo / scales)
    q = torch.round(g / scales[..., None] + zeros[..., None]).clamp_(0, 15).to(torch.uint8)
    return pack_int4(q.view(n, k)), scales.t().contiguous(), zeros.t().contiguous()


if triton is not None:
    @triton.jit
    def _w8a16_kernel(x_ptr, w_ptr, s_ptr, out_ptr, M, N, K,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      UPCAST: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            x = tl.load(x_ptr + offs_m[:, None] * K + kk[None, :],
                        mask=(offs_m[:, None] < M) & (kk[None, :] < K), other=0.0)
            # [BLOCK_K, BLOCK_N] view of the [N, K] weight, so the dot needs no transpose.
            q = tl.load(w_ptr + offs_n[None, :] * K + kk[:, None],
                        mask=(offs_n[None, :] < N) & (kk[:, None] < K), other=0)
            if UPCAST:
                acc += tl.dot(x.to(tl.float32), q.to(tl.float32), input_precision="ieee")
            else:
                # int8 -> fp16/bf16 is exact, so the tensor-core dot loses nothing.
                acc += tl.dot(x, q.to(x.dtype))
        # The scale is per output channel, so it factors out of the K sum.
        scale = tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        acc = acc * scale[None, :]
        tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))

    @triton.jit
    def _w4a16_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, M, N, K, GROUP_SIZE, stride_sg, stride_sn,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      ZERO_POINT: tl.constexpr, UPCAST: tl.constexpr):
        # z_ptr holds zero points (W = (q - z) * s) when ZERO_POINT, else mins (W = q * s + m).
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        half_k = K // 2
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            kmask = kk < K
            x = tl.load(x_ptr + offs_m[:, None] * K + kk[None, :],
                        mask=(offs_m[:, None] < M) & kmask[None, :], other=0.0)
            wmask = (offs_n[None, :] < N) & kmask[:, None]
            # Each byte is loaded for both of its k's (same address, so no extra traffic) and the
            # nibble picked by k's parity: simpler than join/reshape, and fine in the interpreter.
            packed = tl.load(w_ptr + offs_n[None, :] * half_k + (kk[:, None] >> 1), mask=wmask, other=0)
            q = ((packed >> ((kk[:, None] & 1) * 4)) & 0xF).to(tl.float32)
            g_off = (kk[:, None] // GROUP_SIZE) * stride_sg + offs_n[None, :] * stride_sn
            s = tl.load(s_ptr + g_off, mask=wmask, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + g_off, mask=wmask, other=0.0).to(tl.float32)
            if ZERO_POINT:
                w = (q - z) * s  # [BLOCK_K, BLOCK_N]
            else:
                w = q * s + z
            if UPCAST:
                acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
            else:
                acc += tl.dot(x, w.to(x.dtype))
        tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def _upcast(dtype: torch.dtype) -> bool:
    # fp32 activations get an exact fp32 dot (no tf32); bf16 is upcast in the interpreter, whose bf16
    # arithmetic is wrong (triton issue 11584).
    return dtype == torch.float32 or (_INTERPRET and dtype == torch.bfloat16)


def _blocks(m: int) -> tuple[int, int, int]:
    if _INTERPRET:  # interpreter cost is per program and loop step, not per element
        return 16 if m <= 16 else 64, 64, 128
    if m <= 16:  # decode: memory bound, so more N tiles to fill the SMs
        return 16, 64, 128
    return (32, 64, 64) if m <= 32 else (64, 128, 64)


def _check_x(x: torch.Tensor, k: int) -> torch.Tensor:
    assert x.shape[-1] == k, f"x has K={x.shape[-1]}, the weight K={k}"
    assert x.dtype in (torch.float16, torch.bfloat16, torch.float32), x.dtype
    return x.reshape(-1, k).contiguous()


def w8a16_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x @ (qweight * scales[:, None]).T`` with int8 weights dequantized in registers.

    ``x`` is ``[..., K]`` fp16/bf16/fp32; ``qweight`` int8 ``[N, K]``; ``scales`` ``[N]`` (any float
    dtype). Accumulates in fp32 and returns ``[..., N]`` in ``x.dtype``. Any K (tails are masked).
    """
    n, k = qweight.shape
    assert qweight.dtype == torch.int8 and scales.shape == (n,)
    x2 = _check_x(x, k)
    m = x2.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out.view(*x.shape[:-1], n)
    bm, bn, bk = _blocks(m)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _w8a16_kernel[grid](x2, qweight.contiguous(), scales.contiguous(), out, m, n, k,
                        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, UPCAST=_upcast(x.dtype))
    return out.view(*x.shape[:-1], n)


def _w4a16(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
           group_size: int, groups_first: bool, zero_point: bool) -> torch.Tensor:
    n, half_k = qweight.shape
    k = 2 * half_k
    assert qweight.dtype == torch.uint8
    assert k % group_size == 0, f"K={k} is not a multiple of group_size={group_size}"
    want = (k // group_size, n) if groups_first else (n, k // group_size)
    assert scales.shape == offsets.shape == want, (scales.shape, offsets.shape, want)
    assert scales.stride() == offsets.stride(), "scales and zeros/mins need one layout"
    x2 = _check_x(x, k)
    m = x2.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out.view(*x.shape[:-1], n)
    bm, bn, bk = _blocks(m)
    stride_sg, stride_sn = scales.stride() if groups_first else scales.stride()[::-1]
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _w4a16_kernel[grid](x2, qweight.contiguous(), scales, offsets, out, m, n, k, group_size,
                        stride_sg, stride_sn, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                        ZERO_POINT=zero_point, UPCAST=_upcast(x.dtype))
    return out.view(*x.shape[:-1], n)


def w4a16_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 group_size: int) -> torch.Tensor:
    """``x @ W.T`` with ``W = dequantize_int4(qweight, scales, zeros, group_size)`` done in registers.

    ``x`` is ``[..., K]`` fp16/bf16/fp32; ``qweight`` uint8 ``[N, K // 2]`` (low nibble = even k);
    ``scales``/``zeros`` ``[K // G, N]`` floats, ``W[n, k] = (q[n, k] - zeros[g, n]) * scales[g, n]``.
    K must be even and a multiple of ``group_size``. Accumulates in fp32; returns ``[..., N]`` in
    ``x.dtype``.
    """
    return _w4a16(x, qweight, scales, zeros, group_size, groups_first=True, zero_point=True)


def w4a16_matmul_mins(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                      group_size: int) -> torch.Tensor:
    """:func:`w4a16_matmul` for the ``quant.Int4WeightOnly`` state (GGUF Q4_1's formula).

    ``scales``/``mins`` are ``[N, K // G]`` (any float dtype, same strides) and
    ``W[n, k] = q[n, k] * scales[n, k // G] + mins[n, k // G]``; the packing is the same.
    """
    return _w4a16(x, qweight, scales, mins, group_size, groups_first=False, zero_point=False)
