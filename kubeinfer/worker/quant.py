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
  o and gate|up. This state is the one int4 layout: the Triton W4A16 kernel reads it as it is, and
  the CPU's aten kernel gets an exact repacking of it at load.

Each handler has ``quantize(weight [N, K]) -> state``, ``dequantize(state) -> float32 [N, K]`` and
``make_linear(state, bias) -> nn.Module`` (``Int8Linear`` / ``Int4Linear``). Bad input (unknown scheme,
a group size that does not divide K, wrong shapes or dtypes) raises ValueError before anything is
allocated.

Runtime modules (``kernels/quant_linear.py``) take any float activation dtype and return it. The
kernel backend chosen when the model is built picks one per linear (``make_linear(state, bias,
backend)``): aten's CPU weight-only kernels (bf16 activations; ``_weight_int8pack_mm`` needs K % 16
== 0, ``_weight_int4pack_mm_for_cpu`` N % 16 == 0 and packs the nibbles into its own layout,
recovered bit for bit by ``quant_state()``), the C++ CPU kernels, the Triton W8A16 / W4A16 matmuls,
or the torch reference (dequantize, then ``F.linear``). All of them read this one canonical state.

Model-level API:

* ``quantize_model(model, scheme)``: swaps ``attn.qkv_proj``, ``attn.o_proj``, ``mlp.gate_up_proj``
  and ``mlp.down_proj`` of every layer in place, one matrix at a time (each float weight is freed
  as soon as its replacement exists). The LM head / tied embedding stay float.
The checkpoint functions below live in ``quant_checkpoint.py`` and are re-exported here.

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

import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

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
_QUANT_MODULE_RE = re.compile(r"layers\.(\d+)\.(" + "|".join(map(re.escape, QUANTIZED_LINEARS)) + ")")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FP16_MAX = 65504.0
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

    def make_linear(self, state: Mapping[str, torch.Tensor], bias: torch.Tensor | None = None,
                    backend=None) -> nn.Module:
        """The runtime module of ``state`` for ``backend`` (a KernelBackend; default: the torch
        reference backend of the state's device)."""
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

    def make_linear(self, state: Mapping[str, torch.Tensor], bias: torch.Tensor | None = None,
                    backend=None) -> nn.Module:
        n, _ = self.check_state(state)
        _check_bias(bias, n)
        return _backend_for(backend, state["qweight"]).quantized_linear(self, state, bias)


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

    def make_linear(self, state: Mapping[str, torch.Tensor], bias: torch.Tensor | None = None,
                    backend=None) -> nn.Module:
        n, _ = self.check_state(state)
        _check_bias(bias, n)
        return _backend_for(backend, state["qweight"]).quantized_linear(self, state, bias)


def _quantized_types() -> tuple[type, ...]:
    from kubeinfer.worker.kernels.quant_linear import Int4Linear, Int8Linear
    return Int8Linear, Int4Linear


def _backend_for(backend, tensor: torch.Tensor):
    if backend is not None:
        return backend
    from kubeinfer.worker.kernels.torch_backend import TorchBackend
    return TorchBackend(tensor.device)


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
def quantize_model(model: nn.Module, scheme: QuantScheme | str, backend=None) -> nn.Module:
    """Swap every layer's four Linear modules for ``scheme``'s runtime module, in place; returns model.

    All shapes are checked before anything changes. Each float weight is released as soon as its
    quantized replacement exists, so the peak is the model plus one matrix's temporaries. The LM head
    and the (possibly tied) embedding stay float.
    """
    scheme = get_scheme(scheme)
    targets = _linear_targets(model)
    for name, parent, child in targets:
        mod = getattr(parent, child)
        if isinstance(mod, _quantized_types()):
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
        setattr(parent, child, scheme.make_linear(state, bias, backend))
        del mod, state, bias  # the old Linear (and its float weight) is freed here
    model.quant_scheme = scheme
    return model


_LAZY = {name: "kubeinfer.worker.kernels.quant_linear" for name in ("Int8Linear", "Int4Linear", "INT8_GEMM_MIN_ROWS")}
_LAZY.update({name: "kubeinfer.worker.quant_checkpoint" for name in (
    "save_quantized", "quant_scheme_of", "expected_layout", "load_quantized_tensors", "install_quantized")})


def __getattr__(name: str):
    """The runtime modules (kernels/quant_linear.py) and the checkpoint format (quant_checkpoint.py)
    build on the schemes above; re-exported lazily, so any of the modules may be imported first."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib
    return getattr(importlib.import_module(module), name)
