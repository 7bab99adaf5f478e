"""A float checkpoint quantized while it loads: no float copy of the quantized layers on the device.

Hugging Face tensors arrive one at a time; the parts of a fused matrix (q|k|v, gate|up) are kept on
the host until the matrix is complete, then moved to the device, quantized there and handed on as
``(module name, state)`` items for ``quant.install_quantized``. The device therefore holds the
quantized model plus one float matrix, however large the float checkpoint is.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

from kubeinfer.worker.models.config import CheckpointError, ModelConfig
from kubeinfer.worker.models.llama import _target
from kubeinfer.worker.quant import QUANTIZED_LINEARS, QuantScheme


def _linear_shapes(c: ModelConfig) -> dict[str, tuple[int, int]]:
    q, kv, inter, h = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size, c.hidden_size
    return {"attn.qkv_proj": (q + 2 * kv, h), "attn.o_proj": (h, q),
            "mlp.gate_up_proj": (2 * inter, h), "mlp.down_proj": (h, inter)}


def quantize_while_loading(tensors: Iterable[tuple[str, torch.Tensor]], config: ModelConfig, scheme: QuantScheme,
                           device: torch.device) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """``(module, tensors)`` items from Hugging Face-named float tensors: each layer linear quantized
    on ``device`` as soon as all its rows (and bias rows) have arrived; everything else passed on."""
    shapes = _linear_shapes(config)
    pending: dict[str, dict[str, torch.Tensor]] = {}   # module -> {"weight": rows buffer, "bias": ...}
    filled: dict[str, int] = {}                         # module -> rows written so far (weight + bias)
    for hf_name, tensor in tensors:
        for name, rows in _target(hf_name, config):
            if name is None:
                continue
            module, _, leaf = name.rpartition(".")
            kind = module.split(".", 2)[-1] if module.startswith("layers.") else ""
            if kind not in QUANTIZED_LINEARS:
                yield module, {leaf: tensor}
                continue
            n, k = shapes[kind]
            has_bias = kind == "attn.qkv_proj" and config.attention_bias
            if leaf != "weight" and not (leaf == "bias" and has_bias):
                raise CheckpointError(f"checkpoint tensor {hf_name!r} does not belong to this architecture")
            want = (n, k) if leaf == "weight" else (n,)
            buffers = pending.setdefault(module, {})
            if leaf not in buffers:
                buffers[leaf] = torch.empty(want, dtype=tensor.dtype)
            dst = buffers[leaf] if rows is None else buffers[leaf][rows]
            if dst.shape != tensor.shape:
                raise CheckpointError(f"checkpoint tensor {hf_name!r} has shape {tuple(tensor.shape)}, the model "
                                      f"config expects {tuple(dst.shape)}")
            dst.copy_(tensor)
            filled[module] = filled.get(module, 0) + dst.shape[0]
            if filled[module] == n * (2 if has_bias else 1):
                parts = pending.pop(module)
                state = scheme.quantize(parts["weight"].to(device))
                if "bias" in parts:
                    state["bias"] = parts["bias"].to(device)
                yield module, state
    if pending:
        raise CheckpointError(f"checkpoint is missing rows of: {', '.join(sorted(pending)[:5])}")
