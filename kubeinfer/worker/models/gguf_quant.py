"""GGUF quantized tensors straight into kubeinfer's weight-only states, with no float copy of the weights.

* Q4_1 -> ``Int4WeightOnly(group_size=32)``, bit-exact. A Q4_1 block is 20 bytes: fp16 ``d``, fp16
  ``m``, then 16 bytes of nibbles where byte ``j`` holds element ``j`` in its low nibble and element
  ``j + 16`` in its high nibble (gguf-py ``Q4_1.dequantize_blocks`` / ggml ``dequantize_row_q4_1``);
  ``w = d * q + m``. So ``scales = d``, ``mins = m`` (both fp16, unchanged) and the nibbles are
  reordered into our layout (low nibble = even k).
* Q4_0 -> ``Int4WeightOnly(group_size=32)``, bit-exact. 18-byte blocks: fp16 ``d`` + the same nibble
  layout, ``w = d * (q - 8)``, so ``scales = d``, ``mins = -8 * d`` (exact in fp16; a block with
  ``|d| > 8188`` would overflow and is rejected).
* Q8_0 -> ``Int8WeightOnly`` (per output channel), *requantized*. A Q8_0 block is 34 bytes: fp16
  ``d`` + 32 int8 ``q``, ``w = d * q`` with one ``d`` per 32 inputs, while the int8 kernel has one
  scale per output row. We keep the integers' information and re-round once per row:
  ``s = max_b |d_b|`` (rounded up to a bf16 value, so the CPU kernel's bf16 scales are exact) and
  ``q' = round(q * d_b / s)``. Bound: ``|q' * s - q * d_b| <= s / 2`` for every weight, i.e. at most
  half a step of a per-channel int8 grid spanning the row's largest block; blocks whose ``d_b`` is
  close to the row maximum keep (almost) all of their precision, blocks with a much smaller ``d_b``
  lose low-order bits. This is the same bound as quantizing the dequantized row per channel from
  scratch, computed from the integers a row chunk at a time instead of from a float copy.
  (An exact group-wise int8 state would need a group-wise int8 kernel, which aten lacks on the CPU.)

Other types (F32/F16/BF16, Q4_K, Q6_K, ...) have no direct mapping: ``iter_gguf_quantized`` dequantizes
such a tensor with gguf-py and quantizes it with the scheme, one tensor at a time.

llama.cpp stores the rows of Q and K permuted for its rotary layout (llama architecture). Un-permuting
is a row permutation of ``W [N, K]``; ``gguf_quantized_state(..., unpermute_heads=n)`` applies it to
the quantized rows and their per-row / per-group scales, exactly like ``gguf._unpermute`` on floats.
"""

from __future__ import annotations

import re
from typing import Any, Iterator

import numpy as np
import torch

from kubeinfer.worker.models import gguf as gguf_loader
from kubeinfer.worker.models.config import CheckpointError, ModelConfig
from kubeinfer.worker.quant import Int4WeightOnly, Int8WeightOnly, QuantScheme, _round_up, get_scheme

QK = 32  # elements per Q4_0 / Q4_1 / Q8_0 block
_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}
_ROW_CHUNK = 1024


def _shape(tensor: Any) -> tuple[int, int]:
    dims = [int(n) for n in tensor.shape]
    if len(dims) != 2:
        raise ValueError(f"tensor {tensor.name}: expected a 2-D weight, got GGUF shape {dims}")
    k, n = dims  # GGUF lists ne0 (the contiguous, input dimension) first
    return n, k


def _blocks(tensor: Any, n: int, k: int, kind: str) -> np.ndarray:
    """The raw bytes as a read-only uint8 view [N, K // 32, block bytes] of the memory map."""
    raw = np.asarray(tensor.data)
    want = n * (k // QK) * _BLOCK_BYTES[kind]
    if raw.dtype != np.uint8 or raw.size != want:
        raise ValueError(f"tensor {tensor.name}: {raw.size} bytes of {raw.dtype}, expected {want} uint8 for "
                         f"{kind} [{n}, {k}]")
    return raw.reshape(n, k // QK, _BLOCK_BYTES[kind])


def _fp16(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The fp16 field at byte ``offset`` of every block, as a [rows, blocks] float16 array (a copy)."""
    return np.ascontiguousarray(blocks[..., offset:offset + 2]).view(np.float16)[..., 0]


def _nibbles_to_ours(qs: np.ndarray) -> np.ndarray:
    """ggml nibbles [rows, nb, 16] (low = element j, high = element j + 16) -> our packing
    [rows, nb * 16] (byte i: low nibble = element 2i, high nibble = element 2i + 1)."""
    e = np.concatenate((qs & 0x0F, qs >> 4), axis=-1)  # [rows, nb, 32] element order
    return (e[..., 0::2] | (e[..., 1::2] << 4)).reshape(qs.shape[0], -1)


def gguf_quantized_state(tensor: Any, scheme: QuantScheme | str, unpermute_heads: int | None = None
                         ) -> dict[str, torch.Tensor]:
    """The ``scheme`` state of a GGUF ReaderTensor of type Q4_0 / Q4_1 (int4, group 32) or Q8_0 (int8).

    Reads the block bytes with numpy, ``_ROW_CHUNK`` rows at a time; never builds a float copy of the
    matrix. ``unpermute_heads``: undo llama.cpp's rotary row permutation for this many heads (Q and K
    of the llama architecture). Raises ValueError for other tensor types or a scheme that does not
    fit the type (Q4_* needs int4 with group_size 32, Q8_0 needs int8).
    """
    scheme = get_scheme(scheme)
    kind = tensor.tensor_type.name
    if kind not in _BLOCK_BYTES:
        raise ValueError(f"tensor {tensor.name}: GGUF type {kind} has no direct quantized mapping "
                         f"(supported: {', '.join(_BLOCK_BYTES)}); dequantize it and use scheme.quantize")
    if kind in ("Q4_0", "Q4_1") and scheme != Int4WeightOnly(32):
        raise ValueError(f"tensor {tensor.name}: a {kind} tensor maps onto int4 with group_size 32 only, "
                         f"not {scheme.describe()}")
    if kind == "Q8_0" and scheme != Int8WeightOnly():
        raise ValueError(f"tensor {tensor.name}: a Q8_0 tensor maps onto int8 only, not {scheme.describe()}")
    n, k = _shape(tensor)
    if k % QK:
        raise ValueError(f"tensor {tensor.name}: in_features {k} is not a multiple of the {kind} block size {QK}")
    if unpermute_heads is not None and (unpermute_heads <= 0 or n % (2 * unpermute_heads)):
        raise ValueError(f"tensor {tensor.name}: cannot un-permute {n} rows for {unpermute_heads} heads")
    blocks = _blocks(tensor, n, k, kind)
    if kind == "Q8_0":
        state = _q8_0_state(blocks, n, k)
    else:
        state = _q4_state(blocks, n, k, kind, tensor.name)
    if unpermute_heads is not None:
        index = gguf_loader._unpermute(torch.arange(n), unpermute_heads)
        state = scheme.select_rows(state, index)
    return state


def _q4_state(blocks: np.ndarray, n: int, k: int, kind: str, name: str) -> dict[str, torch.Tensor]:
    nb = k // QK
    qweight = np.empty((n, k // 2), dtype=np.uint8)
    for r0 in range(0, n, _ROW_CHUNK):
        qweight[r0:r0 + _ROW_CHUNK] = _nibbles_to_ours(blocks[r0:r0 + _ROW_CHUNK, :, -16:])
    d = _fp16(blocks, 0)
    if kind == "Q4_1":
        m = _fp16(blocks, 2)
    else:
        if np.abs(d.astype(np.float32)).max(initial=0.0) > 8188.0:
            raise ValueError(f"tensor {name}: Q4_0 scale too large for an fp16 min (-8 * d overflows)")
        m = (d * np.float16(-8.0)).astype(np.float16)  # exact: a power-of-two multiple
    assert d.shape == m.shape == (n, nb)
    return {"qweight": torch.from_numpy(qweight), "scales": torch.from_numpy(np.ascontiguousarray(d)),
            "mins": torch.from_numpy(np.ascontiguousarray(m))}


def _q8_0_state(blocks: np.ndarray, n: int, k: int) -> dict[str, torch.Tensor]:
    d = torch.from_numpy(_fp16(blocks, 0).astype(np.float32))  # [N, nb], exact
    row_max = d.abs().amax(dim=1)
    scales = _round_up(row_max, torch.bfloat16).float()  # bf16-exact so the CPU kernel is lossless
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    qweight = torch.empty(n, k, dtype=torch.int8)
    for r0 in range(0, n, _ROW_CHUNK):
        r1 = min(n, r0 + _ROW_CHUNK)
        q = torch.from_numpy(np.ascontiguousarray(blocks[r0:r1, :, 2:]).view(np.int8)).float()  # [rows, nb, 32]
        ratio = d[r0:r1] / safe[r0:r1, None]  # [rows, nb], <= 1
        q = q.mul_(ratio[..., None]).round_().clamp_(-128, 127)
        qweight[r0:r1] = q.view(r1 - r0, k).to(torch.int8)
    return {"qweight": qweight, "scales": scales}


# ----------------------------------------------------------------------------------------------------


_FUSED = {  # GGUF per-layer tensor -> (our fused module, part index, number of parts)
    "attn_q": ("attn.qkv_proj", 0, 3), "attn_k": ("attn.qkv_proj", 1, 3), "attn_v": ("attn.qkv_proj", 2, 3),
    "attn_output": ("attn.o_proj", 0, 1),
    "ffn_gate": ("mlp.gate_up_proj", 0, 2), "ffn_up": ("mlp.gate_up_proj", 1, 2),
    "ffn_down": ("mlp.down_proj", 0, 1),
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_FLOAT_NAMES = {"token_embd.weight": ("embed_tokens", "weight"), "output_norm.weight": ("norm", "weight"),
                "output.weight": ("lm_head", "weight"), "attn_norm": "input_layernorm",
                "ffn_norm": "post_attention_layernorm"}


def iter_gguf_quantized(reader: Any, config: ModelConfig, scheme: QuantScheme | str,
                        dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """``(module name, tensors)`` for every module of the model, in ``install_quantized``'s format.

    Linear weights of type Q4_0/Q4_1 (int4, group 32) or Q8_0 (int8) are mapped directly; other
    types are dequantized (one tensor at a time) and quantized with ``scheme``. q|k|v and gate|up are
    fused once all their parts have been read. Norms and embeddings (and the LM head) stay float in
    ``dtype``.
    """
    scheme = get_scheme(scheme)
    llama = config.family == "llama"
    heads = {"attn_q": config.num_heads, "attn_k": config.num_kv_heads}
    pending: dict[str, dict[str, list]] = {}
    for t in reader.tensors:
        if t.name in ("token_embd.weight", "output_norm.weight", "output.weight"):
            module, leaf = _FLOAT_NAMES[t.name]
            if module == "lm_head" and config.tie_word_embeddings:
                continue
            yield module, {leaf: gguf_loader._dequantize(t, dtype)}
            continue
        m = _LAYER_RE.fullmatch(t.name)
        if m is None:
            raise CheckpointError(f"unexpected tensor {t.name!r} in GGUF file")
        layer, part, leaf = m.groups()
        if part in ("attn_norm", "ffn_norm"):
            yield f"layers.{layer}.{_FLOAT_NAMES[part]}", {"weight": gguf_loader._dequantize(t, dtype)}
            continue
        if part not in _FUSED:
            raise CheckpointError(f"unexpected tensor {t.name!r} in GGUF file")
        module, index, count = _FUSED[part]
        module = f"layers.{layer}.{module}"
        unpermute = heads.get(part) if llama else None
        slot = pending.setdefault(module, {"weight": [None] * count, "bias": [None] * count})
        if leaf == "bias":
            b = gguf_loader._dequantize(t, torch.float32)
            slot["bias"][index] = gguf_loader._unpermute(b, unpermute) if unpermute else b
        else:
            slot["weight"][index] = _linear_state(t, scheme, unpermute)
        want_bias = config.attention_bias and module.endswith("qkv_proj")
        if all(s is not None for s in slot["weight"]) and (not want_bias or all(b is not None for b in slot["bias"])):
            del pending[module]
            states = slot["weight"]
            out = dict(states[0]) if count == 1 else scheme.concat(states)
            if want_bias:
                out["bias"] = torch.cat(slot["bias"]).to(dtype)
            yield module, out
    if pending:
        raise CheckpointError(f"GGUF file is missing parts of: {', '.join(sorted(pending)[:5])}")


def _linear_state(t: Any, scheme: QuantScheme, unpermute: int | None) -> dict[str, torch.Tensor]:
    kind = t.tensor_type.name
    direct = (kind in ("Q4_0", "Q4_1") and scheme == Int4WeightOnly(32)) or \
             (kind == "Q8_0" and scheme == Int8WeightOnly())
    if direct:
        return gguf_quantized_state(t, scheme, unpermute)
    w = gguf_loader._dequantize(t, torch.float32)
    if unpermute:
        w = gguf_loader._unpermute(w, unpermute)
    try:
        return scheme.quantize(w)
    except ValueError as e:
        raise CheckpointError(f"tensor {t.name}: {e}") from None


__all__ = ["gguf_quantized_state", "iter_gguf_quantized"]
