"""The quantized checkpoint format: ``kubeinfer quantize`` writes it, the loader reads it back.

One safetensors file; metadata ``{"kubeinfer_quant": "int8"|"int4", "group_size": "none"|"32"|...,
"format": "kubeinfer-quant-v1"}``; quantized modules stored as ``<module>.qweight`` / ``.scales`` /
``.mins`` / ``.bias`` in the canonical state of their scheme (quant.py), everything else as float
under its parameter name. Everything is validated from the header before any tensor is read.
"""

from __future__ import annotations

import json
from typing import Iterable, Iterator, Mapping

import torch
from torch import nn

from kubeinfer.worker.models.config import CheckpointError, ModelConfig
from kubeinfer.worker.quant import (_FLOAT_DTYPES, _QUANT_MODULE_RE, METADATA_KEY, QuantScheme, _linear_targets,
                                    _quantized_types, get_scheme)


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
    return read_safetensors_header(path).get("__metadata__")


def read_safetensors_header(path: str) -> dict:
    """A safetensors file's JSON header (tensor name -> dtype, shape, offsets; ``__metadata__``);
    CheckpointError naming the file when it is not one."""
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
    return header if isinstance(header, dict) else {}


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
