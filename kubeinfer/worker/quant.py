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
        quantized = {n: m for n, m in source.named_modules() if isinstance(m, _quantized_types())}
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
                      items: Iterable[tuple[str, Mapping[str, torch.Tensor]]], backend=None,
                      device: torch.device | str = "cpu") -> nn.Module:
    """Install ``(module name, tensors)`` items (from load_quantized_tensors or the GGUF direct path).

    Quantized modules are replaced by ``scheme.make_linear`` for ``backend``, their state moved to
    ``device`` first; other tensors are copied into (or, for a meta-device model, become) the existing
    parameters on ``device``, cast to their dtype, one module at a time. Raises CheckpointError
    for an unknown module, a shape mismatch, or a module never provided.
    """
    scheme = get_scheme(scheme)
    targets = {name: (parent, child) for name, parent, child in _linear_targets(model)}
    pending = set(targets) | {n.rpartition(".")[0] for n, _ in model.named_parameters()
                              if not _QUANT_MODULE_RE.fullmatch(n.rpartition(".")[0])}
    for name, tensors in items:
        if name in targets:
            parent, child = targets[name]
            state = {k: v.to(device) for k, v in tensors.items() if k != "bias"}
            bias = tensors.get("bias")
            try:
                setattr(parent, child, scheme.make_linear(state, None if bias is None else bias.to(device), backend))
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
                    setattr(module, leaf, nn.Parameter(value.to(device, param.dtype), requires_grad=False))
                else:
                    param.data.copy_(value)
        pending.discard(name)
    if pending:
        missing = sorted(pending)
        raise CheckpointError(f"checkpoint is missing modules: {', '.join(missing[:5])}"
                              + (" ..." if len(missing) > 5 else ""))
    model.quant_scheme = scheme
    return model


_RUNTIME_NAMES = ("Int8Linear", "Int4Linear", "INT8_GEMM_MIN_ROWS")


def __getattr__(name: str):
    """The runtime modules live with the kernels (kernels/quant_linear.py), which build on the schemes
    above: re-exported lazily, so either module may be imported first."""
    if name in _RUNTIME_NAMES:
        from kubeinfer.worker.kernels import quant_linear
        return getattr(quant_linear, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
