"""RMSNorm, fused residual-add RMSNorm, rotary embedding and the SwiGLU gate as Triton kernels.

Same contracts as the C++ CPU kernels the model calls (kernels/cpu_kernels.cpp, through
``models/llama.py``): every kernel loads its inputs, computes in fp32 and rounds once to the input
dtype on store. Rows may be strided (the row stride is passed), but the last dim must be contiguous.
No host sync and shape-only launch choices, so all of them can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: importing works, the kernels do not exist
    triton = None

_INTERPRET = triton is not None and bool(triton.knobs.runtime.interpret)


if triton is not None:

    @triton.jit
    def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, stride_x, stride_r, stride_o, H, eps,
                         BLOCK_H: tl.constexpr, ADD_RESIDUAL: tl.constexpr):
        # One program per row: the whole row sits in registers, so it is read once.
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_H)
        mask = offs < H
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
        if ADD_RESIDUAL:
            r = tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0)
            # Rounded to the stream's dtype before the norm reads it, as `x + residual` would be.
            s = (x.to(tl.float32) + r.to(tl.float32)).to(res_ptr.dtype.element_ty)
            tl.store(res_ptr + row * stride_r + offs, s, mask=mask)
            x = s
        xf = x.to(tl.float32)
        inv = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / H + eps)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_o + offs, (xf * inv * w).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, stride_xt, stride_xh, stride_ct, stride_st, heads,
                       HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
        # One program per (token, block of heads): the token's cos/sin row is loaded once for its heads.
        t = tl.program_id(0).to(tl.int64)
        offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_HALF)
        dmask = offs_d < HALF
        mask = (offs_h[:, None] < heads) & dmask[None, :]
        c1 = tl.load(cos_ptr + t * stride_ct + offs_d, mask=dmask, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + t * stride_ct + HALF + offs_d, mask=dmask, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + t * stride_st + offs_d, mask=dmask, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + t * stride_st + HALF + offs_d, mask=dmask, other=0.0).to(tl.float32)
        ptr = x_ptr + t * stride_xt + offs_h[:, None] * stride_xh + offs_d[None, :]
        a = tl.load(ptr, mask=mask, other=0.0)
        b = tl.load(ptr + HALF, mask=mask, other=0.0)
        af, bf = a.to(tl.float32), b.to(tl.float32)
        # HF's rotate-half: x * cos + cat(-x2, x1) * sin.
        tl.store(ptr, (af * c1[None, :] - bf * s1[None, :]).to(a.dtype), mask=mask)
        tl.store(ptr + HALF, (bf * c2[None, :] + af * s2[None, :]).to(a.dtype), mask=mask)

    @triton.jit
    def _silu_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, inter, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < inter
        g = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(x_ptr + row * stride_x + inter + offs, mask=mask, other=0.0).to(tl.float32)
        out = g / (1.0 + tl.exp(-g)) * u
        tl.store(out_ptr + row * stride_o + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def _row_warps(block: int) -> int:
    # About 8 elements per thread, 1 to 16 warps.
    return min(16, max(1, block // 256))


def _check_rows(x: torch.Tensor, what: str) -> None:
    assert x.dim() == 2 and x.stride(1) == 1, f"{what} must be [T, H] with a contiguous last dim"


def _norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    _check_rows(x, "x")
    t, h = x.shape
    assert weight.shape == (h,) and weight.is_contiguous(), f"weight must be a contiguous [{h}]"
    out = torch.empty((t, h), dtype=x.dtype, device=x.device)
    if t == 0:
        return out
    res = x if residual is None else residual
    block = triton.next_power_of_2(h)
    _rms_norm_kernel[(t,)](x, res, weight, out, x.stride(0), res.stride(0), out.stride(0), h, eps,
                           BLOCK_H=block, ADD_RESIDUAL=residual is not None, num_warps=_row_warps(block))
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / sqrt(mean(x^2) + eps) * weight`` per row; ``x`` ``[T, H]`` (unit stride in H), ``weight``
    ``[H]`` contiguous, any float dtypes. Returns a new contiguous ``[T, H]`` in ``x.dtype``."""
    return _norm(x, None, weight, eps)


def add_rms_norm_(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The residual add fused with the next norm: ``residual += x`` in place (rounded to residual's dtype,
    as ``x + residual`` would be), then returns ``rms_norm(residual, weight, eps)`` in ``x.dtype``.
    ``x`` and ``residual`` ``[T, H]`` of one dtype, unit stride in H; they must not overlap."""
    _check_rows(residual, "residual")
    assert residual.shape == x.shape and residual.dtype == x.dtype, "x and residual: one shape and dtype"
    return _norm(x, residual, weight, eps)


def rotary_(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_rotated_heads: int) -> None:
    """Rotate, in place, the first ``num_rotated_heads`` heads of ``qkv`` ``[T, heads, d]`` (HF rotate-half).

    For each of those heads, with halves ``x1 = x[:d/2]``, ``x2 = x[d/2:]``:
    ``x1' = x1 * cos[:d/2] - x2 * sin[:d/2]`` and ``x2' = x2 * cos[d/2:] + x1 * sin[d/2:]``, i.e.
    ``models.rope.apply_rotary``. ``cos``/``sin`` ``[T, 1, d]`` or ``[T, d]`` as
    ``RotaryEmbedding.lookup`` returns them (rows may be strided views; d contiguous). ``qkv`` needs a
    contiguous last dim; its token and head strides are free. The other heads are left untouched.
    """
    assert qkv.dim() == 3 and qkv.stride(2) == 1, "qkv must be [T, heads, d] with a contiguous last dim"
    t, heads, d = qkv.shape
    assert d % 2 == 0 and 0 <= num_rotated_heads <= heads
    tables = []
    for name, c in (("cos", cos), ("sin", sin)):
        c = c.squeeze(1) if c.dim() == 3 else c  # a view: [T, 1, d] -> [T, d]
        assert c.shape == (t, d) and c.stride(1) == 1, f"{name} must be [T, 1, d] or [T, d], d contiguous"
        tables.append(c)
    cos2, sin2 = tables
    if t == 0 or num_rotated_heads == 0:
        return
    half = d // 2
    block_h = min(triton.next_power_of_2(num_rotated_heads), 16)
    block_half = triton.next_power_of_2(half)
    grid = (t, triton.cdiv(num_rotated_heads, block_h))
    _rotary_kernel[grid](qkv, cos2, sin2, qkv.stride(0), qkv.stride(1), cos2.stride(0), sin2.stride(0),
                         num_rotated_heads, HALF=half, BLOCK_H=block_h, BLOCK_HALF=block_half,
                         num_warps=_row_warps(block_h * block_half * 2))


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's gate: ``silu(gate_up[:, :I]) * gate_up[:, I:]`` for ``gate_up`` ``[T, 2I]`` (unit stride in
    the last dim); returns a new contiguous ``[T, I]`` in its dtype."""
    _check_rows(gate_up, "gate_up")
    t, two_i = gate_up.shape
    assert two_i % 2 == 0, "gate_up must have an even last dim [T, 2I]"
    inter = two_i // 2
    out = torch.empty((t, inter), dtype=gate_up.dtype, device=gate_up.device)
    if t == 0:
        return out
    block = min(triton.next_power_of_2(inter), 1024 if _INTERPRET else 2048)
    _silu_mul_kernel[(t, triton.cdiv(inter, block))](gate_up, out, gate_up.stride(0), out.stride(0), inter,
                                                     BLOCK=block, num_warps=_row_warps(block))
    return out
