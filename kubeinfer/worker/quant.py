"""Weight-only quantization: an offline state-dict transform plus a runtime module swap.

Two schemes, one handler class each (``get_scheme(name, group_size)`` builds them by name):

* ``Int8WeightOnly`` ("int8"): symmetric, one scale per output channel.
  State: ``qweight`` int8 ``[N, K]`` (nn.Linear orientation), ``scales`` float32 ``[N]``;
  ``W[n, k] = qweight[n, k] * scales[n]``. Our quantizer rounds every scale *up* to a bfloat16
  value, so the bf16 CPU kernel sees the scales exactly and ``|W - deq| <= scales[n] / 2`` holds both
  for ``dequantize`` and for the runtime module.
* ``Int4WeightOnly(group_size)`` ("int4", group_size 32, 64 or 128): asymmetric per group of
  ``group_size`` consecutive inputs, llama.cpp Q4_1's formula. State: ``qweight`` uint8 ``[N, K // 2]``
  (two 4-bit values per byte along K: low nibble = even k, high nibble = odd k; values 0..15),
  ``scales`` and ``mins`` float16 ``[N, K // G]``; ``W[n, k] = q[n, k] * scales[n, g] + mins[n, g]``
  with ``g = k // G``. GGUF Q4_1 blocks (32 weights, fp16 d and m) map onto group_size 32 bit-exactly
  (see ``kubeinfer.worker.models.gguf_quant``). ``|W - deq| <= |scales| / 2`` per group (our quantizer
  rounds mins down and scales up to fp16 to keep that bound; GGUF Q4_0 maps to a negative scale).
  The group size must divide K: for the default model (hidden 576) that rules out 128 for q|k|v,
  o and gate|up. (The Triton kernels in kernels/triton_matmul.py use the same nibble packing but
  ``scales``/``zeros`` ``[K // G, N]`` with ``W = (q - zeros) * scales``: ``zeros = -mins / scales``.)

Each handler has ``quantize(weight [N, K]) -> state``, ``dequantize(state) -> float32 [N, K]`` and
``make_linear(state, bias) -> nn.Module`` (``Int8Linear`` / ``Int4Linear``). Bad input (unknown scheme,
a group size that does not divide K, wrong shapes or dtypes) raises ValueError before anything is
allocated.

Runtime modules take any float activation dtype and return it. On the CPU they run the aten
weight-only kernels, which are only fast with bf16 activations, so activations are cast to bf16 and the
result back (bf16-level error, like a bf16 model; int4 also rounds its fp16 scales and
``min + 8 * scale`` zeros to bf16, a relative 2^-9):

* ``torch.ops.aten._weight_int8pack_mm(x bf16 [M, K] contiguous, qweight int8 [N, K], scales bf16 [N])
  -> bf16 [M, N] = x @ (qweight * scales[:, None]).T``. The scales must have x's dtype. In torch 2.13 it
  needs K % 16 == 0 (other K crash or return NaN); other shapes use the fallback below.
  Its cost grows linearly with M (no reuse across rows), so from ``INT8_GEMM_MIN_ROWS`` (32) rows on
  Int8Linear instead runs a bf16 GEMM on the integer weights (exact in bf16) and scales the output:
  2-4x faster at prefill sizes. The int4 kernel scales the same way and has no such path yet (its
  canonical nibbles are not kept, and dequantizing int4 on the CPU is slow): int4 prefill is
  ~2-4x slower than fp32 at M >= 128.
* ``torch.ops.aten._convert_weight_to_int4pack_for_cpu(q int32 [N, K] values 0..15, innerKTiles)
  -> uint8 [N, K // 2]`` in an opaque blocked layout (innerKTiles is ignored on the CPU; N % 16 == 0,
  K even). Packing row blocks that start at multiples of 64 gives the same bytes as packing the
  whole matrix, so we pack 1024 rows at a time to bound the int32 temporary.
* ``torch.ops.aten._weight_int4pack_mm_for_cpu(x bf16 [M, K], packed, group_size, scales_and_zeros
  bf16 [K // G, N, 2]) -> bf16 [M, N]`` with ``W = (q - 8) * scale + zero`` (verified numerically), so
  ``zero = min + 8 * scale``. group_size in {32, 64, 128, 256}, K % group_size == 0.

On other devices (and for shapes the aten kernels reject) the modules dequantize to the activation
dtype and call ``F.linear``: correct, but it re-materialises the float weight every call.
``Int4Linear`` built from CPU tensors keeps only the aten-packed weight; ``quant_state()`` recovers the
canonical state from it (bit-exactly) for saving. Build the module on the device it will run on:
moving a CPU-packed ``Int4Linear`` to another device is not supported.

Model-level API:

* ``quantize_model(model, scheme)``: swaps ``attn.qkv_proj``, ``attn.o_proj``, ``mlp.gate_up_proj``
  and ``mlp.down_proj`` of every layer in place, one matrix at a time (each float weight is freed
  as soon as its replacement exists). The LM head / tied embedding stay float.
* ``save_quantized(source, path, scheme)``: ``source`` is a model (quantized or float) or an iterable
  of ``(name, tensor)`` in this model's parameter names (``layers.3.attn.qkv_proj.weight``, ...).
  Writes one safetensors file with metadata ``{"kubeinfer_quant": "int8"|"int4", "group_size":
  "none"|"32"|..., "format": "kubeinfer-quant-v1"}``. Quantized modules are stored as
  ``<module>.qweight``/``.scales``/``.mins``/``.bias``, everything else as float under its parameter
  name. The caller copies config.json / tokenizer files next to it.
* ``quant_scheme_of(path)``: the scheme a safetensors file was saved with, or None for a plain one.
* ``load_quantized_tensors(path, config, scheme=None) -> (scheme, iterator of (module name, tensors))``:
  validates metadata, names, shapes and dtypes against a ModelConfig (CheckpointError, a ValueError,
  naming the problem) before reading any tensor, then yields one module at a time, e.g.
  ``("layers.0.attn.qkv_proj", {"qweight": ..., "scales": ..., "bias": ...})`` or
  ``("norm", {"weight": ...})``.
* ``install_quantized(model, scheme, items)``: puts such items (from ``load_quantized_tensors`` or
  ``gguf_quant.iter_gguf_quantized``) into a LlamaForCausalLM, which may live on the meta device:
  float parameters are then materialised from the items and the float weights of quantized layers
  are never allocated (so skip ``to_empty`` for a quantized load).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from kubeinfer.worker.models.config import CheckpointError, ModelConfig

__all__ = [
    "QuantScheme", "Int8WeightOnly", "Int4WeightOnly", "Int8Linear", "Int4Linear", "get_scheme",
    "quantize_model", "save_quantized", "quant_scheme_of", "load_quantized_tensors", "install_quantized",
    "QUANTIZED_LINEARS", "METADATA_KEY",
]

METADATA_KEY = "kubeinfer_quant"
FORMAT = "kubeinfer-quant-v1"
INT4_GROUP_SIZES = (32, 64, 128)
# The per-layer Linear modules quantize_model swaps (paths inside a DecoderLayer).
QUANTIZED_LINEARS = ("attn.qkv_proj", "attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
_QUANT_MODULE_RE = re.compile(r"layers\.(\d+)\.(attn\.qkv_proj|attn\.o_proj|mlp\.gate_up_proj|mlp\.down_proj)")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FP16_MAX = 65504.0
# Int8Linear on the CPU: from this many activation rows on, a bf16 GEMM on the integer weights beats
# the aten weight-only kernel, whose cost grows linearly with the rows (measured: benchmarks/quant.py).
INT8_GEMM_MIN_ROWS = 32
_GEMM_BLOCK_ELEMS = 1 << 21  # weights converted to bf16 per block on that path (4 MiB)
# Rows quantized / packed per step: bounds the float and int32 temporaries for big matrices. A
# multiple of 64 (the aten int4 packing is row-block-local in 64-row blocks).
_CHUNK_ROWS = 1024


# ----------------------------------------------------------------------------------------------------
# helpers


def _round_up(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` (float32) rounded towards +inf to ``dtype``."""
    r = x.to(dtype)
    low = r.float() < x
    if bool(low.any()):
        r = torch.where(low, torch.nextafter(r, torch.full_like(r, math.inf)), r)
    return r


def _round_down(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    r = x.to(dtype)
    high = r.float() > x
    if bool(high.any()):
        r = torch.where(high, torch.nextafter(r, torch.full_like(r, -math.inf)), r)
    return r


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8/int ``[N, K]`` values 0..15 -> uint8 ``[N, K // 2]``; low nibble = even k."""
    if q.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even K (two values per byte), got K={q.shape[-1]}")
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, K // 2]`` -> uint8 ``[N, K]`` values 0..15 (inverse of ``pack_int4``)."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


def _check_weight(weight: Any) -> tuple[int, int]:
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    if weight.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"weight must be float32/float16/bfloat16, got {weight.dtype}")
    if weight.is_meta:
        raise ValueError("weight is on the meta device (no data to quantize)")
    n, k = weight.shape
    if n == 0 or k == 0:
        raise ValueError(f"weight has an empty dimension: shape {tuple(weight.shape)}")
    return n, k


def _check_bias(bias: Any, n: int) -> None:
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor) or bias.dim() != 1 or bias.shape[0] != n:
        shape = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(f"bias must be a 1-D tensor of {n} elements (out_features), got {shape}")
    if bias.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"bias must be a float tensor, got {bias.dtype}")


def _check_keys(state: Any, required: tuple[str, ...], scheme: str) -> None:
    if not isinstance(state, Mapping):
        raise ValueError(f"{scheme} state must be a dict of tensors, got {type(state).__name__}")
    missing = [k for k in required if k not in state]
    extra = [k for k in state if k not in required]
    if missing or extra:
        raise ValueError(f"{scheme} state must have exactly the keys {list(required)}"
                         + (f"; missing {missing}" if missing else "") + (f"; unexpected {extra}" if extra else ""))
    for k in required:
        if not isinstance(state[k], torch.Tensor):
            raise ValueError(f"{scheme} state[{k!r}] must be a torch.Tensor, got {type(state[k]).__name__}")


def _float_check(t: torch.Tensor, what: str) -> None:
    if t.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{what} must be float32/float16/bfloat16, got {t.dtype}")


def _linear_fallback(x2: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    dtype = x2.dtype if x2.dtype in _FLOAT_DTYPES else torch.float32
    return F.linear(x2.to(dtype), weight.to(dtype))


# ----------------------------------------------------------------------------------------------------
# schemes


class QuantScheme:
    """Base of the handlers. Frozen dataclasses: two handlers are equal when name and group size are."""

    name: str = ""
    group_size: int | None = None
    state_keys: tuple[str, ...] = ()

    def state_shapes(self, n: int, k: int) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def check_shape(self, n: int, k: int) -> None:
        """Raise ValueError when a [n, k] weight cannot use this scheme."""

    def check_state(self, state: Mapping[str, torch.Tensor]) -> tuple[int, int]:
        raise NotImplementedError

    def quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def dequantize(self, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def make_linear(self, state: Mapping[str, torch.Tensor], bias: torch.Tensor | None = None) -> nn.Module:
        raise NotImplementedError

    def metadata(self) -> dict[str, str]:
        return {METADATA_KEY: self.name, "group_size": str(self.group_size or "none"), "format": FORMAT}

    def describe(self) -> str:
        return self.name if self.group_size is None else f"{self.name} (group_size {self.group_size})"

    def concat(self, states: list[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Stack states along the output dimension (fusing q|k|v or gate|up)."""
        if not states:
            raise ValueError("concat needs at least one state")
        ks = {self.check_state(s)[1] for s in states}
        if len(ks) != 1:
            raise ValueError(f"cannot concatenate states with different in_features {sorted(ks)}")
        out = {}
        for key in self.state_keys:
            parts = [s[key] for s in states]
            dtype = parts[0].dtype
            for p in parts[1:]:
                dtype = torch.promote_types(dtype, p.dtype)
            out[key] = torch.cat([p.to(dtype) for p in parts])
        return out

    def select_rows(self, state: Mapping[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The state of ``W[index]`` (a row permutation or selection): every tensor is row-indexed."""
        self.check_state(state)
        return {k: state[k].index_select(0, index.to(state[k].device)) for k in self.state_keys}


@dataclass(frozen=True)
class Int8WeightOnly(QuantScheme):
    """Symmetric int8, one scale per output channel (see the module docstring)."""

    name = "int8"
    state_keys = ("qweight", "scales")

    def state_shapes(self, n: int, k: int) -> dict[str, tuple[int, ...]]:
        return {"qweight": (n, k), "scales": (n,)}

    def check_state(self, state: Mapping[str, torch.Tensor]) -> tuple[int, int]:
        _check_keys(state, self.state_keys, "int8")
        q, s = state["qweight"], state["scales"]
        if q.dtype != torch.int8 or q.dim() != 2:
            raise ValueError(f"int8 qweight must be a 2-D int8 tensor [N, K], got {q.dtype} {tuple(q.shape)}")
        _float_check(s, "int8 scales")
        if s.shape != (q.shape[0],):
            raise ValueError(f"int8 scales must have shape ({q.shape[0]},) (one per output channel of "
                             f"qweight {tuple(q.shape)}), got {tuple(s.shape)}")
        return q.shape[0], q.shape[1]

    @torch.no_grad()
    def quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        n, k = _check_weight(weight)
        qweight = torch.empty(n, k, dtype=torch.int8, device=weight.device)
        scales = torch.empty(n, dtype=torch.float32, device=weight.device)
        for r0 in range(0, n, _CHUNK_ROWS):
            w = weight[r0:r0 + _CHUNK_ROWS].to(torch.float32, copy=True)
            amax = w.abs().amax(dim=1)
            if not bool(torch.isfinite(amax).all()):
                raise ValueError("weight has NaN or infinite values")
            s = _round_up(amax / 127.0, torch.bfloat16).float()
            scales[r0:r0 + _CHUNK_ROWS] = s
            safe = torch.where(s > 0, s, torch.ones_like(s))
            qweight[r0:r0 + _CHUNK_ROWS] = w.div_(safe[:, None]).round_().clamp_(-127, 127).to(torch.int8)
        return {"qweight": qweight, "scales": scales}

    def dequantize(self, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        self.check_state(state)
        return state["qweight"].float() * state["scales"].float()[:, None]

    def make_linear(self, state: Mapping[str, torch.Tensor], bias: torch.Tensor | None = None) -> "Int8Linear":
        n, _ = self.check_state(state)
        _check_bias(bias, n)
        return Int8Linear(state["qweight"], state["scales"], bias)


@dataclass(frozen=True)
class Int4WeightOnly(QuantScheme):
    """Asymmetric int4 per group of ``group_size`` inputs, ``W = q * scale + min`` (see the module docstring)."""

    group_size: int = 32  # type: ignore[assignment]
    name = "int4"
    state_keys = ("qweight", "scales", "mins")

    def __post_init__(self) -> None:
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) \
                or self.group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"int4 group_size must be one of {', '.join(map(str, INT4_GROUP_SIZES))}, "
                             f"got {self.group_size!r}")

    def check_shape(self, n: int, k: int) -> None:
        if k % self.group_size:
            raise ValueError(f"int4 group_size {self.group_size} does not divide in_features K={k} "
                             f"(choose a group size that divides {k})")

    def state_shapes(self, n: int, k: int) -> dict[str, tuple[int, ...]]:
        return {"qweight": (n, k // 2), "scales": (n, k // self.group_size), "mins": (n, k // self.group_size)}

    def check_state(self, state: Mapping[str, torch.Tensor]) -> tuple[int, int]:
        _check_keys(state, self.state_keys, "int4")
        q, s, m = state["qweight"], state["scales"], state["mins"]
        if q.dtype != torch.uint8 or q.dim() != 2:
            raise ValueError(f"int4 qweight must be a 2-D uint8 tensor [N, K // 2] (two 4-bit values per byte), "
                             f"got {q.dtype} {tuple(q.shape)}")
        n, k = q.shape[0], 2 * q.shape[1]
        self.check_shape(n, k)
        _float_check(s, "int4 scales")
        _float_check(m, "int4 mins")
        want = (n, k // self.group_size)
        if s.shape != want or m.shape != want:
            raise ValueError(f"int4 scales and mins must have shape {want} ([N, K // group_size] for qweight "
                             f"{tuple(q.shape)}, group_size {self.group_size}), got {tuple(s.shape)} and "
                             f"{tuple(m.shape)}")
        return n, k

    @torch.no_grad()
    def quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        n, k = _check_weight(weight)
        if k % 2:
            raise ValueError(f"int4 needs an even in_features K, got {k}")
        self.check_shape(n, k)
        g = self.group_size
        ng = k // g
        dev = weight.device
        qweight = torch.empty(n, k // 2, dtype=torch.uint8, device=dev)
        scales = torch.empty(n, ng, dtype=torch.float16, device=dev)
        mins = torch.empty(n, ng, dtype=torch.float16, device=dev)
        for r0 in range(0, n, _CHUNK_ROWS):
            w = weight[r0:r0 + _CHUNK_ROWS].to(torch.float32, copy=True)
            rows = w.shape[0]
            w = w.view(rows, ng, g)
            lo, hi = w.amin(dim=-1), w.amax(dim=-1)
            if not (bool(torch.isfinite(lo).all()) and bool(torch.isfinite(hi).all())):
                raise ValueError("weight has NaN or infinite values")
            if float(torch.maximum(lo.abs(), hi.abs()).max()) > _FP16_MAX / 2:
                raise ValueError("int4 stores float16 scales and mins: weights must be smaller than 32752 "
                                 "in magnitude")
            # min rounded down and scale rounded up keep every weight inside [min, min + 15 * scale].
            m = _round_down(lo, torch.float16)
            s = _round_up((hi - m.float()) / 15.0, torch.float16)
            mins[r0:r0 + rows], scales[r0:r0 + rows] = m, s
            sf = s.float()
            safe = torch.where(sf > 0, sf, torch.ones_like(sf))
            q = w.sub_(m.float()[..., None]).div_(safe[..., None]).round_().clamp_(0, 15)
            qweight[r0:r0 + rows] = pack_int4(q.view(rows, k))
        return {"qweight": qweight, "scales": scales, "mins": mins}

    def dequantize(self, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        n, k = self.check_state(state)
        q = unpack_int4(state["qweight"]).float().view(n, k // self.group_size, self.group_size)
        # q * scale + min, in this order: bit-identical to gguf-py's Q4_1 ``d * q + m``.
        w = q * state["scales"].float()[..., None] + state["mins"].float()[..., None]
        return w.view(n, k)

    def make_linear(self, state: Mapping[str, torch.Tensor], bias: torch.Tensor | None = None) -> "Int4Linear":
        n, _ = self.check_state(state)
        _check_bias(bias, n)
        return Int4Linear(state["qweight"], state["scales"], state["mins"], self.group_size, bias)


def get_scheme(name: str | QuantScheme, group_size: int | None = None) -> QuantScheme:
    """``"int8"`` (per-channel; no group size) or ``"int4"`` (group_size 32, 64 or 128; default 32)."""
    if isinstance(name, QuantScheme):
        if group_size is not None and group_size != name.group_size:
            raise ValueError(f"scheme {name.describe()} given with a different group_size {group_size}")
        return name
    if not isinstance(name, str):
        raise ValueError(f"quantization scheme must be a string ('int8' or 'int4'), got {type(name).__name__}")
    key = name.strip().lower()
    if key == "int8":
        if group_size is not None:
            raise ValueError(f"int8 quantization is per output channel and takes no group_size (got {group_size})")
        return Int8WeightOnly()
    if key == "int4":
        return Int4WeightOnly(32 if group_size is None else group_size)
    raise ValueError(f"unknown quantization scheme {name!r}; supported: 'int8', 'int4'")


# ----------------------------------------------------------------------------------------------------
# runtime modules


def _cpu_int8_ok(k: int) -> bool:
    return k % 16 == 0 and hasattr(torch.ops.aten, "_weight_int8pack_mm")


def _triton_ok() -> bool:
    """CUDA tensors go to the Triton W8A16 / W4A16 kernels when triton imports."""
    from kubeinfer.worker.kernels.triton_attention import triton
    return triton is not None


def _cpu_int4_ok(n: int, k: int, group_size: int) -> bool:
    return (n % 16 == 0 and k % group_size == 0 and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
            and hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"))


class Int8Linear(nn.Module):
    """``y = x @ (qweight * scales[:, None]).T + bias`` for any float ``x [..., K]``, returned in x's dtype."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        Int8WeightOnly().check_state({"qweight": qweight, "scales": scales})
        _check_bias(bias, qweight.shape[0])
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("scales", scales.float())
        self.register_buffer("scales_bf16", scales.to(torch.bfloat16), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self._fast_cpu = _cpu_int8_ok(self.in_features)
        self.kernels: ModuleType | None = None  # the C++ CPU kernels, set by use_cpu_kernels()

    scheme = Int8WeightOnly()

    def quant_state(self) -> dict[str, torch.Tensor]:
        return {"qweight": self.qweight, "scales": self.scales}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels is not None and x.dim() == 2 and x.shape[0] < INT8_GEMM_MIN_ROWS \
                and x.dtype == torch.float32:
            # The decode path, first (every Python step here is paid 120 times per token): fp32
            # activations at ~1.5x the aten kernel's weight bandwidth.
            y = self.kernels.int8_gemv(x.contiguous(), self.qweight, self.scales)
            return y if self.bias is None else y.add_(self.bias)
        x2 = x.reshape(-1, self.in_features)
        if x.device.type == "cpu" and x2.shape[0] >= INT8_GEMM_MIN_ROWS:
            y = self._gemm(x2).to(x.dtype)
        elif x.device.type == "cpu" and self._fast_cpu:
            xb = x2.to(torch.bfloat16)
            if not xb.is_contiguous():
                xb = xb.contiguous()
            y = torch.ops.aten._weight_int8pack_mm(xb, self.qweight, self.scales_bf16).to(x.dtype)
        elif x.is_cuda and _triton_ok():
            from kubeinfer.worker.kernels.triton_matmul import w8a16_matmul
            y = w8a16_matmul(x2, self.qweight, self.scales)
        else:
            dtype = x.dtype if x.dtype in _FLOAT_DTYPES else torch.float32
            y = _linear_fallback(x2, self.qweight.to(dtype) * self.scales.to(dtype)[:, None]).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def _gemm(self, x2: torch.Tensor) -> torch.Tensor:
        """Many rows (prefill, big decode batches): the aten kernel's cost is ~linear in M, a bf16 GEMM
        on the integer weights (exact in bf16) with the per-channel scale applied to the fp32 output
        is faster. Weight rows are converted a cache-sized block at a time (a whole LM head at once
        would be a 56 MB temporary per call)."""
        xb = x2.to(torch.bfloat16)
        n = self.out_features
        rows = max(64, _GEMM_BLOCK_ELEMS // self.in_features)
        if rows >= n:
            y = F.linear(xb, self.qweight.to(torch.bfloat16)).float()
        else:
            y = torch.empty(x2.shape[0], n, dtype=torch.float32, device=x2.device)
            for r0 in range(0, n, rows):
                y[:, r0:r0 + rows] = F.linear(xb, self.qweight[r0:r0 + rows].to(torch.bfloat16))
        return y.mul_(self.scales)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int4Linear(nn.Module):
    """``y = x @ W.T + bias`` with ``W = q * scales + mins`` per group, for any float ``x [..., K]``.

    Built from CPU tensors (and N % 16 == 0), the weight is repacked once for the aten CPU kernel and
    the canonical nibbles are dropped (``quant_state()`` recovers them); otherwise the canonical
    state is kept and each call dequantizes.
    """

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None = None) -> None:
        super().__init__()
        scheme = Int4WeightOnly(group_size)
        n, k = scheme.check_state({"qweight": qweight, "scales": scales, "mins": mins})
        _check_bias(bias, n)
        self.scheme = scheme
        self.out_features, self.in_features, self.group_size = n, k, group_size
        self.register_buffer("scales", scales.detach().clone())
        self.register_buffer("mins", mins.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.cpu_packed = qweight.device.type == "cpu" and _cpu_int4_ok(n, k, group_size)
        self.kernels: ModuleType | None = None  # the C++ CPU kernels, set by use_cpu_kernels()
        if self.cpu_packed:
            self.register_buffer("qweight", None)
            self.register_buffer("packed", _pack_for_cpu(qweight), persistent=False)
            s = scales.float()
            zeros = mins.float() + 8.0 * s  # the kernel computes (q - 8) * scale + zero
            self.register_buffer("scales_and_zeros", torch.stack((s, zeros), dim=-1).transpose(0, 1)
                                 .contiguous().to(torch.bfloat16), persistent=False)
        else:
            self.register_buffer("qweight", qweight.contiguous())
            self.register_buffer("packed", None, persistent=False)
            self.register_buffer("scales_and_zeros", None, persistent=False)

    def quant_state(self) -> dict[str, torch.Tensor]:
        """The canonical state (``qweight`` nibbles, ``scales``, ``mins``), exactly as constructed."""
        q = self.qweight if self.qweight is not None else _unpack_from_cpu(
            self.packed, self.out_features, self.in_features, self.group_size)
        return {"qweight": q, "scales": self.scales, "mins": self.mins}

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.scheme.dequantize(self.quant_state()).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels is not None and self.cpu_packed and x.dim() == 2 and x.dtype == torch.float32:
            y = self.kernels.int4pack_linear(x, self.packed, self.group_size, self.scales_and_zeros)
            return y if self.bias is None else y.add_(self.bias)
        x2 = x.reshape(-1, self.in_features)
        if self.cpu_packed:
            if x.device.type != "cpu":
                raise RuntimeError("this Int4Linear was packed for the CPU kernel; build it with "
                                   "make_linear() from a state on the device it should run on")
            xb = x2.to(torch.bfloat16)
            if not xb.is_contiguous():
                xb = xb.contiguous()
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, self.packed, self.group_size,
                                                           self.scales_and_zeros).to(x.dtype)
        elif x.is_cuda and _triton_ok():
            from kubeinfer.worker.kernels.triton_matmul import w4a16_matmul_mins
            y = w4a16_matmul_mins(x2, self.qweight, self.scales, self.mins, self.group_size)
        else:
            dtype = x.dtype if x.dtype in _FLOAT_DTYPES else torch.float32
            y = _linear_fallback(x2, self.scheme.dequantize(self.quant_state()).to(dtype)).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, bias={self.bias is not None}, cpu_packed={self.cpu_packed}")


def _pack_for_cpu(qweight: torch.Tensor) -> torch.Tensor:
    n, half = qweight.shape
    out = torch.empty(n, half, dtype=torch.uint8)
    for r0 in range(0, n, _CHUNK_ROWS):
        q = unpack_int4(qweight[r0:r0 + _CHUNK_ROWS]).to(torch.int32)
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


# ----------------------------------------------------------------------------------------------------
# model-level


def _linear_targets(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    layers = getattr(model, "layers", None)
    if layers is None:
        raise ValueError("quantize_model expects a LlamaForCausalLM-style model with a .layers list")
    out = []
    for i, layer in enumerate(layers):
        for path in QUANTIZED_LINEARS:
            parent_path, _, child = path.rpartition(".")
            out.append((f"layers.{i}.{path}", layer.get_submodule(parent_path), child))
    return out


@torch.no_grad()
def quantize_model(model: nn.Module, scheme: QuantScheme | str) -> nn.Module:
    """Swap every layer's four Linear modules for ``scheme``'s runtime module, in place; returns model.

    All shapes are checked before anything changes. Each float weight is released as soon as its
    quantized replacement exists, so the peak is the model plus one matrix's temporaries. The LM head
    and the (possibly tied) embedding stay float.
    """
    scheme = get_scheme(scheme)
    targets = _linear_targets(model)
    for name, parent, child in targets:
        mod = getattr(parent, child)
        if isinstance(mod, (Int8Linear, Int4Linear)):
            raise ValueError(f"{name} is already quantized")
        if not isinstance(mod, nn.Linear):
            raise ValueError(f"{name} is a {type(mod).__name__}, expected nn.Linear")
        if mod.weight.is_meta:
            raise ValueError(f"{name} has no data (meta device); load the weights first")
        try:
            scheme.check_shape(mod.out_features, mod.in_features)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
    for name, parent, child in targets:
        mod = getattr(parent, child)
        state = scheme.quantize(mod.weight)
        bias = None if mod.bias is None else mod.bias.detach()
        setattr(parent, child, scheme.make_linear(state, bias))
        del mod, state, bias  # the old Linear (and its float weight) is freed here
    model.quant_scheme = scheme
    return model


def save_quantized(source: nn.Module | Iterable[tuple[str, torch.Tensor]], path: str,
                   scheme: QuantScheme | str | None = None) -> QuantScheme:
    """Write a quantized safetensors checkpoint; returns the scheme used.

    ``source``: a model whose layers are already quantized (``scheme`` may be omitted, and must match
    if given), a float model, or ``(name, tensor)`` pairs in the model's parameter names (float
    tensors; the four per-layer linear weights are quantized one at a time, everything else is
    stored as given).
    """
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    if isinstance(source, nn.Module):
        quantized = {n: m for n, m in source.named_modules() if isinstance(m, (Int8Linear, Int4Linear))}
        if quantized:
            used = {m.scheme for m in quantized.values()}
            if len(used) > 1:
                raise ValueError(f"model mixes quantization schemes: {sorted(s.describe() for s in used)}")
            found = used.pop()
            if scheme is not None and get_scheme(scheme) != found:
                raise ValueError(f"model is quantized with {found.describe()}, not {get_scheme(scheme).describe()}")
            scheme = found
            for name, mod in quantized.items():
                for k, v in mod.quant_state().items():
                    tensors[f"{name}.{k}"] = v.detach().contiguous().cpu()
                if mod.bias is not None:
                    tensors[f"{name}.bias"] = mod.bias.detach().contiguous().cpu()
        items: Iterable[tuple[str, torch.Tensor]] = (
            (n, p) for n, p in source.named_parameters()
            if n.rpartition(".")[0] not in quantized)
    else:
        items = source
    if scheme is None:
        raise ValueError("save_quantized needs a scheme for an unquantized source")
    scheme = get_scheme(scheme)
    for name, t in items:
        module, _, leaf = name.rpartition(".")
        if leaf == "weight" and _QUANT_MODULE_RE.fullmatch(module):
            for k, v in scheme.quantize(t.detach()).items():
                tensors[f"{module}.{k}"] = v.contiguous().cpu()
        else:
            tensors[name] = t.detach().contiguous().cpu().clone()
    save_file(tensors, path, metadata=scheme.metadata())
    return scheme


def quant_scheme_of(path: str) -> QuantScheme | None:
    """The scheme recorded in a safetensors file's metadata, None when it has none (a float checkpoint)."""
    meta = _read_metadata(path)
    if not meta or METADATA_KEY not in meta:
        return None
    return _scheme_from_metadata(meta, path)


def _read_metadata(path: str) -> dict[str, str] | None:
    # The header is JSON behind an 8-byte little-endian length: no tensor is read or mapped.
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if size <= 0 or size > 100 << 20:
                raise CheckpointError(f"{path}: not a safetensors file")
            header = json.loads(f.read(size))
    except OSError as e:
        raise CheckpointError(f"cannot read {path!r}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: not a safetensors file (corrupt header)") from None
    return header.get("__metadata__") if isinstance(header, dict) else None


def _scheme_from_metadata(meta: Mapping[str, str], path: str) -> QuantScheme:
    name = meta.get(METADATA_KEY)
    gs = meta.get("group_size", "none")
    try:
        return get_scheme(name, None if gs in ("none", "", None) else int(gs))
    except ValueError as e:
        raise CheckpointError(f"{path}: bad quantization metadata ({METADATA_KEY}={name!r}, group_size={gs!r}): "
                              f"{e}") from None


def expected_layout(config: ModelConfig, scheme: QuantScheme) -> dict[str, dict[str, tuple[int, ...]]]:
    """Module name -> {tensor name: shape} of a quantized checkpoint for ``config``."""
    h, inter = config.hidden_size, config.intermediate_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    out: dict[str, dict[str, tuple[int, ...]]] = {"embed_tokens": {"weight": (config.vocab_size, h)}}
    for i in range(config.num_layers):
        p = f"layers.{i}"
        out[f"{p}.input_layernorm"] = {"weight": (h,)}
        qkv = dict(scheme.state_shapes(q + 2 * kv, h))
        if config.attention_bias:
            qkv["bias"] = (q + 2 * kv,)
        out[f"{p}.attn.qkv_proj"] = qkv
        out[f"{p}.attn.o_proj"] = scheme.state_shapes(h, q)
        out[f"{p}.post_attention_layernorm"] = {"weight": (h,)}
        out[f"{p}.mlp.gate_up_proj"] = scheme.state_shapes(2 * inter, h)
        out[f"{p}.mlp.down_proj"] = scheme.state_shapes(h, inter)
    out["norm"] = {"weight": (h,)}
    if not config.tie_word_embeddings:
        out["lm_head"] = {"weight": (config.vocab_size, h)}
    return out


_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I8": torch.int8,
              "U8": torch.uint8}


def load_quantized_tensors(path: str, config: ModelConfig, scheme: QuantScheme | str | None = None
                           ) -> tuple[QuantScheme, Iterator[tuple[str, dict[str, torch.Tensor]]]]:
    """Validate a quantized safetensors file against ``config`` and return ``(scheme, items)``.

    Everything (metadata, scheme, expected/unexpected/missing names, shapes, dtypes) is checked from
    the header before any tensor is read; problems raise CheckpointError. ``scheme``, if given, must
    equal the file's. ``items`` yields ``(module name, {tensor name: tensor})`` one module at a time
    (one module materialised at a time; the tensors own their memory).
    """
    meta = _read_metadata(path)
    if not meta or METADATA_KEY not in meta:
        raise CheckpointError(f"{path}: not a kubeinfer quantized checkpoint (no {METADATA_KEY!r} metadata)")
    found = _scheme_from_metadata(meta, path)
    if scheme is not None:
        wanted = get_scheme(scheme)
        if wanted != found:
            raise CheckpointError(f"{path}: checkpoint is quantized with {found.describe()}, "
                                  f"but {wanted.describe()} was requested")
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    layout = expected_layout(config, found)
    problems: list[str] = []
    seen: set[str] = set()
    for full, info in header.items():
        module, _, leaf = full.rpartition(".")
        want = layout.get(module, {}).get(leaf)
        if want is None:
            problems.append(f"unexpected tensor {full!r}")
            continue
        seen.add(full)
        shape, dtype = tuple(info.get("shape", ())), _ST_DTYPES.get(info.get("dtype"))
        if shape != want:
            problems.append(f"tensor {full!r} has shape {shape}, the config and {found.describe()} expect {want}")
        want_dtype = ({"qweight": torch.int8 if found.name == "int8" else torch.uint8}.get(leaf))
        if want_dtype is not None and dtype != want_dtype:
            problems.append(f"tensor {full!r} has dtype {info.get('dtype')}, expected {want_dtype}")
        elif want_dtype is None and dtype not in _FLOAT_DTYPES:
            problems.append(f"tensor {full!r} has dtype {info.get('dtype')}, expected a float type")
    for module, leaves in layout.items():
        for leaf in leaves:
            if f"{module}.{leaf}" not in seen:
                problems.append(f"missing tensor {module}.{leaf!s}")
    if problems:
        raise CheckpointError(f"{path}: checkpoint does not match the model config ({len(problems)} problems): "
                              + "; ".join(problems[:5]) + (" ..." if len(problems) > 5 else ""))

    def items() -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(path, framework="pt") as f:
                for module, leaves in layout.items():
                    # get_tensor returns a view of safetensors' file mapping, which is unmapped when the
                    # file is closed: clone so the yielded tensors own their memory.
                    yield module, {leaf: f.get_tensor(f"{module}.{leaf}").clone() for leaf in leaves}
        except SafetensorError as e:
            raise CheckpointError(f"{path}: corrupt or unreadable safetensors file ({e})") from None

    return found, items()


@torch.no_grad()
def install_quantized(model: nn.Module, scheme: QuantScheme | str,
                      items: Iterable[tuple[str, Mapping[str, torch.Tensor]]]) -> nn.Module:
    """Install ``(module name, tensors)`` items (from load_quantized_tensors or the GGUF direct path).

    Quantized modules are replaced by ``scheme.make_linear``; other tensors are copied into (or, for
    a meta-device model, become) the existing parameters, cast to their dtype. Raises CheckpointError
    for an unknown module, a shape mismatch, or a module never provided.
    """
    scheme = get_scheme(scheme)
    targets = {name: (parent, child) for name, parent, child in _linear_targets(model)}
    pending = set(targets) | {n.rpartition(".")[0] for n, _ in model.named_parameters()
                              if not _QUANT_MODULE_RE.fullmatch(n.rpartition(".")[0])}
    for name, tensors in items:
        if name in targets:
            parent, child = targets[name]
            state = {k: v for k, v in tensors.items() if k != "bias"}
            try:
                setattr(parent, child, scheme.make_linear(state, tensors.get("bias")))
            except ValueError as e:
                raise CheckpointError(f"{name}: {e}") from None
        else:
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise CheckpointError(f"checkpoint module {name!r} does not belong to this model") from None
            for leaf, value in tensors.items():
                param = getattr(module, leaf, None)
                if not isinstance(param, torch.Tensor):
                    raise CheckpointError(f"checkpoint tensor {name}.{leaf} does not belong to this model")
                if param.shape != value.shape:
                    raise CheckpointError(f"checkpoint tensor {name}.{leaf} has shape {tuple(value.shape)}, "
                                          f"the model expects {tuple(param.shape)}")
                if param.is_meta:
                    setattr(module, leaf, nn.Parameter(value.to(param.dtype), requires_grad=False))
                else:
                    param.data.copy_(value)
        pending.discard(name)
    if pending:
        missing = sorted(pending)
        raise CheckpointError(f"checkpoint is missing modules: {', '.join(missing[:5])}"
                              + (" ..." if len(missing) > 5 else ""))
    model.quant_scheme = scheme
    return model
