"""A decode step of the whole decoder stack in one C++ call (decode_stack.cpp), for the cpp backend.

Built once, when the model is bound (``LlamaForCausalLM.bind`` -> ``CppBackend.decode_stack``),
from the modules' own tensors, and only when every layer runs the C++ kernels on fp32 activations
(fp32, int8 or int4 linears; not bf16, whose linears are packed for AMX or oneDNN). The model's
``forward`` hands it decode-only steps of fewer than ``max_rows`` rows, the sizes where every linear
takes its GEMV; prefill chunks and larger batches keep the per-module path, which runs the same
kernels (the two agree bit for bit: tests/test_decode_stack.py).
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import nn

from kubeinfer.worker.kernels.attention import AttentionMetadata, LayerKVCache


class DecodeStack:
    """Owns the C++ ``DecodeStack`` (references to every layer's weights and to the K/V caches) and
    the row bound below which it runs. Invariant: the model's modules are not moved or converted
    after it is built (a new ``bind`` builds a new one)."""

    def __init__(self, impl, max_rows: int) -> None:
        self._impl = impl
        self.max_rows = max_rows
        self._caches: list[LayerKVCache] | None = None

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_caches: list[LayerKVCache],
                 meta: AttentionMetadata) -> torch.Tensor:
        """The final norm's output ``[T, hidden]`` for a decode-only step's embeddings ``x`` (consumed)."""
        if kv_caches is not self._caches:  # the runner allocates its caches once: bound on first use
            self._impl.set_caches([c.k for c in kv_caches], [c.v for c in kv_caches])
            self._caches = kv_caches
        return self._impl.forward(x, cos, sin, meta.slot_mapping, meta.decode_block_tables, meta.decode_context_lens)


def build_decode_stack(model: nn.Module, kernels: ModuleType) -> DecodeStack | None:
    """The stack for ``model`` (a LlamaForCausalLM), or None when a layer does not run entirely on the
    C++ fp32-activation kernels: a torch or packed bf16 linear, a fused SwiGLU, a float KV cache that is
    not fp32."""
    c = model.config
    if model.norm.weight.dtype != torch.float32:
        return None
    stack = kernels.DecodeStack(heads=c.num_heads, kv_heads=c.num_kv_heads, head_dim=c.head_dim, eps=c.rms_norm_eps,
                                scale=c.head_dim ** -0.5, final_norm=model.norm.weight.detach())
    max_rows = None
    for layer in model.layers:
        linears = (layer.attn.qkv_proj, layer.attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)
        if not all(hasattr(m, "decode_linear") for m in linears) or layer.mlp._act is not kernels.silu_mul:
            return None
        stack.add_layer(layer.input_layernorm.weight.detach(), *(m.decode_linear(kernels) for m in linears[:2]),
                        layer.post_attention_layernorm.weight.detach(),
                        *(m.decode_linear(kernels) for m in linears[2:]))
        bound = min(m.decode_max_rows for m in linears)
        max_rows = bound if max_rows is None else min(max_rows, bound)
    if max_rows is None:
        return None
    return DecodeStack(stack, max_rows)
