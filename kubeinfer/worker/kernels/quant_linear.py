"""The runtime modules of the weight-only schemes (``quant.Int8WeightOnly``, ``quant.Int4WeightOnly``).

``Int8Linear`` and ``Int4Linear`` hold a scheme's canonical state (the quant.py docstring gives the
formats) and are the torch reference on any device: they dequantize and call ``F.linear``. Each
kernel backend swaps in its own subclass when the model is built (``KernelBackend.quantized_linear``),
so a module's ``forward`` is its kernel call and never asks where it runs:

* ``AtenInt8Linear`` / ``AtenInt4Linear``: torch's CPU weight-only kernels, which are fast only with
  bf16 activations (so activations are cast to bf16 and back). ``AtenInt4Linear`` keeps only aten's
  packed weight; ``quant_state()`` recovers the canonical nibbles from it bit for bit.
* ``CppInt8Linear`` / ``CppInt4Linear``: fp32 activations (a bf16 model's widened) through the C++
  CPU kernels: Q8 activations times the weights in the kernels' interleaved int8 / Q4 layouts.
* ``TritonInt8Linear`` / ``TritonInt4Linear``: the Triton W8A16 / W4A16 matmuls on the canonical
  state (CUDA, or Triton's interpreter).

Every subclass is an instance of its canonical class, so ``isinstance(m, Int4Linear)`` finds a
quantized linear whatever backend runs it.
"""

from __future__ import annotations

import sys
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from kubeinfer.worker.kernels.kernel_layouts import pack_int8, pack_q4, unpack_int8, unpack_q4
from kubeinfer.worker.quant import (Int4WeightOnly, Int8WeightOnly, _check_bias, pack_int4, unpack_int4)

# Int8 on the CPU: from this many activation rows on, a bf16 GEMM on the integer weights beats the
# aten weight-only kernel, whose cost grows linearly with the rows (measured: benchmarks/quant.py).
INT8_GEMM_MIN_ROWS = 32
# The C++ int8 and int4 kernels (interleaved layouts, Q8 activations) take inputs of every row count
# on the avx2 and avx512 tiers: against a GEMM on weights converted a block of rows at a time they
# won at 512 and 2048 rows (the model's four linears, 2048 rows: int4 1.75-1.92x the fp32 GEMM on an
# AVX2 node, 1.28-1.40x the bf16 one at the avx512 tier; docs/benchmarks.md, "CPU, part 8"). On the
# amx tier, where oneDNN's GEMMs run on AMX tiles, that GEMM takes over from this many rows, as
# measured before the kernels' threading was mended; it has not been measured since (no AMX here).
AMX_QUANT_KERNEL_MAX_ROWS = 128
GEMM_BLOCK_ELEMS = 1 << 21  # weights converted to bf16 per block on that path (4 MiB)
# Rows packed per step for aten's int4 layout: bounds the int32 temporary. A multiple of 64 (aten's
# int4 packing is row-block-local in 64-row blocks).
_PACK_ROWS = 1024


def _with_bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return y if bias is None else y.add_(bias)


class BoundDecode:
    """Mixin of a module whose decode call binds its tensors once (``_bind_decode``, see
    ``_decode_call``): a copy (copy.deepcopy, pickle) and a moved or converted module bind their
    own tensors again."""

    def _bind_decode(self) -> None:
        raise NotImplementedError

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        self._bind_decode()

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self._bind_decode()
        return out


class Int8Linear(nn.Module):
    """``y = x @ (qweight * scales[:, None]).T + bias`` for a float ``x [..., K]``, in x's dtype.

    The torch reference: the weight is dequantized to the activation dtype on every call.
    """

    scheme = Int8WeightOnly()

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        Int8WeightOnly().check_state({"qweight": qweight, "scales": scales})
        _check_bias(bias, qweight.shape[0])
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("scales", scales.float())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def quant_state(self) -> dict[str, torch.Tensor]:
        return {"qweight": self.qweight, "scales": self.scales}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.qweight.to(x.dtype) * self.scales.to(x.dtype)[:, None]
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class AtenInt8Linear(Int8Linear):
    """CPU: aten's ``_weight_int8pack_mm`` (bf16 activations; needs K % 16 == 0) below
    ``INT8_GEMM_MIN_ROWS`` rows, a bf16 GEMM on the integer weights (exact in bf16) from there."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__(qweight, scales, bias)
        if self.in_features % 16:
            raise ValueError(f"aten's int8 kernel needs in_features % 16 == 0, got {self.in_features}")
        self.register_buffer("scales_bf16", self.scales.to(torch.bfloat16), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] >= INT8_GEMM_MIN_ROWS:
            y = self._gemm(x2).to(x.dtype)
        else:
            y = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16).contiguous(), self.qweight,
                                                   self.scales_bf16).to(x.dtype)
        return _with_bias(y, self.bias).view(*x.shape[:-1], self.out_features)

    def _gemm(self, x2: torch.Tensor) -> torch.Tensor:
        """The aten kernel's cost is ~linear in M; a bf16 GEMM on the integer weights with the
        per-channel scale applied to the fp32 output is faster for many rows. Weight rows are
        converted a cache-sized block at a time (a whole LM head at once would be a 56 MB temporary
        per call)."""
        xb = x2.to(torch.bfloat16)
        n = self.out_features
        rows = max(64, GEMM_BLOCK_ELEMS // self.in_features)
        if rows >= n:
            y = F.linear(xb, self.qweight.to(torch.bfloat16)).float()
        else:
            y = torch.empty(x2.shape[0], n, dtype=torch.float32, device=x2.device)
            for r0 in range(0, n, rows):
                y[:, r0:r0 + rows] = F.linear(xb, self.qweight[r0:r0 + rows].to(torch.bfloat16))
        return y.mul_(self.scales)


class CppInt8Linear(BoundDecode, Int8Linear):
    """fp32 activations (bf16 ones widened) on the C++ kernels, with the weight in the kernels'
    interleaved int8 layout (int8_gemm.cpp; packed once here, the canonical ``qweight`` and
    ``scales`` dropped: ``quant_state()`` recovers them exactly): ``int8_gemv`` (Q8 activations,
    integer dot products) below ``decode_max_rows`` rows (``quant_kernel_max_rows``: every row
    count but on the amx tier), a GEMM on the integer weights converted a block of rows at a time
    from there. Any K (padded with zeros to whole blocks of 32 in the layout)."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None, *,
                 kernels: ModuleType) -> None:
        super().__init__(qweight, scales, bias)
        qs, kernel_scales = pack_int8(self.qweight, self.scales)
        self.register_buffer("qs", qs, persistent=False)
        self.register_buffer("kernel_scales", kernel_scales, persistent=False)
        self.qweight = self.scales = None
        self._gemv, self._rows = kernels.int8_gemv, kernels.int8_rows
        self._gemm_dtype = gemm_dtype()
        self.decode_max_rows = quant_kernel_max_rows(kernels)
        self._bind_decode()

    def _bind_decode(self) -> None:
        self._decode = _decode_call(self._gemv, (self.qs, self.kernel_scales, self.out_features), self.bias)

    def decode_linear(self, kernels: ModuleType):
        """The decode kernel and its operands for kernels/decode_stack.py (below ``decode_max_rows`` rows)."""
        return kernels.DecodeLinear.int8(self.qs, self.kernel_scales, self.out_features, self.bias)

    def quant_state(self) -> dict[str, torch.Tensor]:
        q, s = unpack_int8(self.qs, self.kernel_scales, self.out_features, self.in_features)
        return {"qweight": q, "scales": s}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:  # a bf16 model: the kernels take fp32 (the widening is exact)
            return self.forward(x.float()).to(x.dtype)
        if x.shape[0] < self.decode_max_rows:  # the decode path first: paid 120 times per token
            return self._decode(x.contiguous())
        n, k = self.out_features, self.in_features
        y = _blocked_gemm(x, n, k, self._gemm_dtype,  # the integers are exact in bf16
                          lambda r0, rows: self._rows(self.qs, self.kernel_scales, n, k, r0, rows).to(self._gemm_dtype))
        return _with_bias(y.mul_(self.kernel_scales.view(-1)[:n]), self.bias)


class TritonInt8Linear(Int8Linear):
    """The Triton W8A16 matmul on the canonical state (fp32 accumulation)."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__(qweight, scales, bias)
        from kubeinfer.worker.kernels.triton_matmul import w8a16_matmul
        self._matmul = w8a16_matmul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._matmul(x, self.qweight, self.scales)
        return y if self.bias is None else y + self.bias.to(y.dtype)


class Int4Linear(nn.Module):
    """``y = x @ W.T + bias`` with ``W = q * scales + mins`` per group, for a float ``x [..., K]``.

    The torch reference: the weight is dequantized to the activation dtype on every call.
    """

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None = None) -> None:
        super().__init__()
        scheme = Int4WeightOnly(group_size)
        n, k = scheme.check_state({"qweight": qweight, "scales": scales, "mins": mins})
        _check_bias(bias, n)
        self.scheme = scheme
        self.out_features, self.in_features, self.group_size = n, k, group_size
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("scales", scales.detach().clone())
        self.register_buffer("mins", mins.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def quant_state(self) -> dict[str, torch.Tensor]:
        """The canonical state (``qweight`` nibbles, ``scales``, ``mins``), exactly as constructed."""
        return {"qweight": self.qweight, "scales": self.scales, "mins": self.mins}

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.scheme.dequantize(self.quant_state()).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")


class AtenInt4Linear(Int4Linear):
    """CPU: aten's ``_weight_int4pack_mm_for_cpu`` on its own packed layout (needs N % 16 == 0).

    The canonical nibbles are dropped once packed; ``quant_state()`` recovers them. aten computes
    ``(q - 8) * scale + zero``, so ``zero = min + 8 * scale`` (both rounded to bf16, a relative 2^-9).
    """

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None = None) -> None:
        super().__init__(qweight, scales, mins, group_size, bias)
        if self.out_features % 16:
            raise ValueError(f"aten's int4 kernel needs out_features % 16 == 0, got {self.out_features}")
        self.register_buffer("packed", _pack_for_cpu(self.qweight), persistent=False)
        self.qweight = None
        s = self.scales.float()
        zeros = self.mins.float() + 8.0 * s
        self.register_buffer("scales_and_zeros", torch.stack((s, zeros), dim=-1).transpose(0, 1)
                             .contiguous().to(torch.bfloat16), persistent=False)

    def quant_state(self) -> dict[str, torch.Tensor]:
        q = _unpack_from_cpu(self.packed, self.out_features, self.in_features, self.group_size)
        return {"qweight": q, "scales": self.scales, "mins": self.mins}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size,
                                                       self.scales_and_zeros).to(x.dtype)
        return _with_bias(y, self.bias).view(*x.shape[:-1], self.out_features)


class CppInt4Linear(BoundDecode, Int4Linear):
    """fp32 activations (bf16 ones widened) on the C++ kernels, with the weight in the kernels'
    interleaved Q4 layout (q4_gemm.cpp; packed once here, and the canonical nibbles, scales and
    mins dropped: ``quant_state()`` recovers them exactly): ``q4_gemv`` (Q8 activations, integer
    dot products) for inputs below ``decode_max_rows`` rows (``quant_kernel_max_rows``: every row
    count but on the amx tier), and from there a GEMM on the weight dequantized a block of rows at a
    time."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None = None, *, kernels: ModuleType) -> None:
        super().__init__(qweight, scales, mins, group_size, bias)
        qs, kernel_scales, kernel_mins = pack_q4(self.qweight, self.scales, self.mins)
        self.register_buffer("qs", qs, persistent=False)
        self.register_buffer("kernel_scales", kernel_scales, persistent=False)
        self.register_buffer("kernel_mins", kernel_mins, persistent=False)
        self._state_dtype = self.scales.dtype
        self.qweight = self.scales = self.mins = None
        self._gemv, self._dequant = kernels.q4_gemv, kernels.q4_dequant
        self._gemm_dtype = gemm_dtype()
        self.decode_max_rows = quant_kernel_max_rows(kernels)
        self._bind_decode()

    def _bind_decode(self) -> None:
        self._decode = _decode_call(self._gemv, (self.qs, self.kernel_scales, self.kernel_mins, self.group_size,
                                                 self.out_features), self.bias)

    def decode_linear(self, kernels: ModuleType):
        """The decode kernel and its operands for kernels/decode_stack.py (below ``decode_max_rows`` rows)."""
        return kernels.DecodeLinear.q4(self.qs, self.kernel_scales, self.kernel_mins, self.group_size,
                                       self.out_features, self.bias)

    def quant_state(self) -> dict[str, torch.Tensor]:
        q, s, m = unpack_q4(self.qs, self.kernel_scales, self.kernel_mins, self.out_features, self._state_dtype)
        return {"qweight": q, "scales": s, "mins": m}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:  # a bf16 model: the kernels take fp32 (the widening is exact)
            return self.forward(x.float()).to(x.dtype)
        if x.shape[0] < self.decode_max_rows:  # the decode path first: paid 120 times per token
            return self._decode(x.contiguous())
        y = _blocked_gemm(x, self.out_features, self.in_features, self._gemm_dtype,
                          lambda r0, rows: self._dequant(self.qs, self.kernel_scales, self.kernel_mins,
                                                         self.group_size, self.out_features, r0, rows)
                          .to(self._gemm_dtype))
        return _with_bias(y, self.bias)


def _decode_call(gemv, operands: tuple, bias: torch.Tensor | None):
    """``x -> gemv(x, *operands) (+ bias)`` with the module's tensors bound once: a decode step calls
    ~120 linears, and reading each operand through ``nn.Module.__getattr__`` cost ~3.5 us per call
    (6.1 us in all against 2.6 us for the kernel alone, o_proj-sized int4, one thread)."""
    if bias is None:
        return lambda x: gemv(x, *operands)
    return lambda x: gemv(x, *operands).add_(bias)


def quant_kernel_max_rows(kernels: ModuleType) -> int:
    """Rows from which a CppInt8Linear / CppInt4Linear takes the blocked GEMM instead of its kernel:
    ``AMX_QUANT_KERNEL_MAX_ROWS`` on the amx tier, no bound (``sys.maxsize``) on the others."""
    return AMX_QUANT_KERNEL_MAX_ROWS if getattr(kernels, "tier", None) == "amx" else sys.maxsize


def gemm_dtype() -> torch.dtype:
    """The prefill GEMMs' operand dtype: bf16 where this CPU multiplies bf16 natively (AVX512-BF16 or
    AMX), fp32 elsewhere (oneDNN's bf16 matmul without them is slower than fp32)."""
    from kubeinfer.worker.kernels.packed_linear import packing_supported
    return torch.bfloat16 if packing_supported() else torch.float32


def _blocked_gemm(x2: torch.Tensor, n: int, k: int, dtype: torch.dtype, weight_rows) -> torch.Tensor:
    """fp32 ``x2 @ W.T`` with W's rows made by ``weight_rows(r0, rows)`` in ``dtype`` a block at a
    time: a whole LM head at once would be a tens-of-MB temporary per call."""
    xd = x2.to(dtype)
    rows = max(64, GEMM_BLOCK_ELEMS // k)
    if rows >= n:
        return F.linear(xd, weight_rows(0, n)).float()
    y = torch.empty(x2.shape[0], n, dtype=torch.float32, device=x2.device)
    for r0 in range(0, n, rows):
        w = weight_rows(r0, min(rows, n - r0))
        y[:, r0:r0 + w.shape[0]] = F.linear(xd, w)
    return y


class TritonInt4Linear(Int4Linear):
    """The Triton W4A16 matmul on the canonical state (fp32 accumulation)."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None = None) -> None:
        super().__init__(qweight, scales, mins, group_size, bias)
        from kubeinfer.worker.kernels.triton_matmul import w4a16_matmul
        self._matmul = w4a16_matmul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._matmul(x, self.qweight, self.scales, self.mins, self.group_size)
        return y if self.bias is None else y + self.bias.to(y.dtype)


def _pack_for_cpu(qweight: torch.Tensor) -> torch.Tensor:
    n, half = qweight.shape
    out = torch.empty(n, half, dtype=torch.uint8)
    for r0 in range(0, n, _PACK_ROWS):
        q = unpack_int4(qweight[r0:r0 + _PACK_ROWS]).to(torch.int32)
        out[r0:r0 + q.shape[0]] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    return out


@torch.no_grad()
def _unpack_from_cpu(packed: torch.Tensor, n: int, k: int, group_size: int) -> torch.Tensor:
    """Canonical nibbles from the aten-packed layout, without relying on that layout: multiplying the
    identity by the weight with scale 1 and zero 0 returns ``q - 8`` (small integers, exact in bf16)."""
    sz = torch.zeros(k // group_size, n, 2, dtype=torch.bfloat16)
    sz[..., 0] = 1.0
    q = torch.empty(n, k, dtype=torch.uint8)
    step = 256
    for k0 in range(0, k, step):
        c = min(step, k - k0)
        eye = torch.zeros(c, k, dtype=torch.bfloat16)
        eye[torch.arange(c), k0 + torch.arange(c)] = 1.0
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, packed, group_size, sz)  # [c, n] = q - 8
        q[:, k0:k0 + c] = (y.float() + 8.0).to(torch.uint8).t()
    return pack_int4(q)


def aten_int8_fits(k: int) -> bool:
    return k % 16 == 0 and hasattr(torch.ops.aten, "_weight_int8pack_mm")


def aten_int4_fits(n: int, k: int, group_size: int) -> bool:
    return (n % 16 == 0 and k % group_size == 0 and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
            and hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"))
