"""The Llama family in one implementation: Llama, SmolLM, Mistral, and Qwen2 (q/k/v biases).

Projections are fused at load time (q|k|v into one matrix, gate|up into another) so a layer costs
four matmuls: fewer kernel launches and less Python per token on the decode path.
"""

from __future__ import annotations

import re
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from kubeinfer.worker.kernels import torch_backend as reference
from kubeinfer.worker.kernels.attention import AttentionMetadata, LayerKVCache, paged_attention, write_kv
from kubeinfer.worker.models.config import CheckpointError, ModelConfig
from kubeinfer.worker.models.rope import RotaryEmbedding


def _same(x: torch.Tensor) -> torch.Tensor:
    return x


def _reference_attention(q, k, v, cache: LayerKVCache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Attention before ``bind``: the torch path, without a backend's reusable buffers."""
    write_kv(cache, k, v, meta.slot_mapping)
    return paged_attention(q, k, v, cache, meta, scale)


class RMSNorm(nn.Module):
    """RMSNorm with the residual add fused in (vLLM's layer signature); its kernels are bound by
    ``LlamaForCausalLM.bind`` (the torch reference until then)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self._norm = reference.rms_norm
        self._add_norm_ = reference.add_rms_norm_

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """``norm(x)``; with ``residual``, ``(norm(x + residual), x + residual)``: one pass over the
        hidden states instead of two. The sum is written into ``residual``, which the caller owns."""
        if residual is None:
            return self._norm(x, self.weight, self.eps)
        return self._add_norm_(x, residual, self.weight, self.eps), residual


class Attention(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.q_size = c.num_heads * c.head_dim
        self.kv_size = c.num_kv_heads * c.head_dim
        self.scale = c.head_dim ** -0.5
        self.qkv_proj = nn.Linear(c.hidden_size, self.q_size + 2 * self.kv_size, bias=c.attention_bias)
        self.o_proj = nn.Linear(self.q_size, c.hidden_size, bias=False)
        self._rotary_ = reference.rotary_
        self._attention = _reference_attention

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: LayerKVCache, meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x).view(t, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        # q and k heads are adjacent: rotate them in one call (in place: qkv is ours), then split.
        self._rotary_(qkv, cos, sin, self.num_heads + self.num_kv_heads)
        q, k, v = qkv.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=1)
        o = self._attention(q, k, v, kv_cache, meta, self.scale)
        return self.o_proj(o.reshape(t, self.q_size))


class MLP(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.intermediate = c.intermediate_size
        self.gate_up_proj = nn.Linear(c.hidden_size, 2 * c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)
        # silu(gate) * up; the identity when gate_up_proj already returns it (an AMX PackedLinear
        # with its SwiGLU fused, swapped in by pack_bf16_weights).
        self._act = reference.silu_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self._act(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, residual, cos, sin, kv_cache, meta):
        """Takes and returns ``(x, residual)``: the residual stream is ``x + residual``, and its adds
        are fused into the norms (``residual`` is None before the first layer)."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm(x, residual)
        h, residual = self.post_attention_layernorm(self.attn(h, cos, sin, kv_cache, meta), residual)
        return self.mlp(h), residual


class LlamaForCausalLM(nn.Module):
    """A decoder over a flattened batch of tokens from many sequences.

    ``forward`` takes ``input_ids``/``positions`` ``[T]`` and the per-layer paged caches and returns
    hidden states ``[T, hidden]``; ``compute_logits`` maps the rows that sample to float32 logits.
    """

    def __init__(self, config: ModelConfig, max_positions: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(
            config.hidden_size, config.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config, max_positions, dtype)
        self.quantized_head: nn.Module | None = None
        self.decode_stack = None  # set by bind where the backend runs a decode step in one call

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[LayerKVCache], meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary.lookup(positions)
        stack = self.decode_stack
        if stack is not None and not meta.prefills and x.shape[0] < stack.max_rows:
            return stack(x, cos, sin, kv_caches, meta)
        residual = None
        for layer, kv in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, cos, sin, kv, meta)
        return self.norm(x, residual)[0]

    def bind(self, backend) -> None:
        """Hand every layer its kernels from ``backend`` (a kernels.backend.KernelBackend), once:
        the norms, the rotary embedding, attention and the SwiGLU gate (unless gate_up_proj fuses
        it), and the backend's one-call decode stack if it has one. Quantized and packed linears
        were swapped in already, when they were built."""
        from kubeinfer.worker.kernels.packed_linear import PackedLinear
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module._norm, module._add_norm_ = backend.rms_norm, backend.add_rms_norm_
            elif isinstance(module, Attention):
                module._rotary_, module._attention = backend.rotary_, backend.attention
            elif isinstance(module, MLP):
                fused = isinstance(module.gate_up_proj, PackedLinear) and module.gate_up_proj.swiglu
                module._act = _same if fused else backend.silu_mul
        # Last: it reads the kernels bound above and the final linears.
        self.decode_stack = backend.decode_stack(self)

    def pack_bf16_weights(self, kernels=None) -> int:
        """bf16 on a CPU: every linear into a packed layout (kernels/packed_linear.py): AMX tiles
        when ``kernels`` (the C++ module) can run them, with each gate|up weight fused with its
        SwiGLU, else oneDNN's. A tied head gets a packed copy of the embedding (lookups keep the
        plain table): the head is the largest matrix a decode step reads, and unpacked, oneDNN
        reorders all of it every step. The copy costs vocab x hidden bf16 (56 MB for SmolLM2-135M).
        Returns how many linears were packed."""
        from kubeinfer.worker.kernels.packed_linear import PackedLinear, amx_fits, amx_kernels, pack_bf16_linears
        amx = amx_kernels(kernels)
        packed = 0
        for mlp in (layer.mlp for layer in self.layers):
            gate_up = mlp.gate_up_proj
            if (amx is not None and type(gate_up) is nn.Linear and gate_up.weight.dtype == torch.bfloat16
                    and amx_fits(gate_up.weight.shape, swiglu=True)):
                mlp.gate_up_proj = PackedLinear(gate_up.weight, gate_up.bias, amx=amx, swiglu=True)
                mlp._act = _same
                packed += 1
        packed += pack_bf16_linears(self, amx)
        if packed and self.lm_head is None and self.quantized_head is None:
            self.lm_head = PackedLinear(self.embed_tokens.weight, amx=amx)
            packed += 1
        return packed

    def compute_logits(self, hidden: torch.Tensor, widen: bool = True) -> torch.Tensor:
        """Logits of ``hidden`` rows, in fp32; with ``widen`` False in whatever dtype the head
        computes them (for a plain-greedy argmax, which they do not change)."""
        if self.quantized_head is not None:
            logits = self.quantized_head(hidden)
        elif self.lm_head is not None:  # an nn.Linear, or its PackedLinear swap (bf16 on CPU)
            logits = self.lm_head(hidden)
        else:
            logits = F.linear(hidden, self.embed_tokens.weight)
        return logits.float() if widen else logits

    def quantize_head(self, backend=None) -> None:
        """Run the LM head as int8 per-channel (the largest matrix: a third of a small model's bytes).

        The float head (or the tied embedding, still used for lookups) stays; a tied model gains an
        int8 copy of it. Decode reads the head every step, so this is where int8 pays most.
        """
        from kubeinfer.worker.quant import Int8WeightOnly
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        scheme = Int8WeightOnly()
        self.quantized_head = scheme.make_linear(scheme.quantize(weight.detach()), None, backend)
        if self.lm_head is not None:
            self.lm_head = None  # untied: the float head is no longer needed
            self.embed_tokens.weight.requires_grad_(False)

    def load_weights(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face-named tensors into the (fused) parameters, one tensor at a time.

        Raises CheckpointError for a tensor of the wrong shape, an unknown name, or a parameter the
        checkpoint never provided.
        """
        params = dict(self.named_parameters())
        pending = set(params)
        for hf_name, tensor in tensors:
            for name, rows in _target(hf_name, self.config):
                if name is None:
                    continue
                param = params.get(name)
                if param is None:
                    raise CheckpointError(f"checkpoint tensor {hf_name!r} does not belong to this architecture")
                dst = param.data if rows is None else param.data[rows]
                if dst.shape != tensor.shape:
                    raise CheckpointError(
                        f"checkpoint tensor {hf_name!r} has shape {tuple(tensor.shape)}, "
                        f"the model config expects {tuple(dst.shape)}")
                dst.copy_(tensor)
                pending.discard(name)
        if pending:
            raise CheckpointError(f"checkpoint is missing tensors for: {', '.join(sorted(pending)[:5])}"
                                  + (" ..." if len(pending) > 5 else ""))


_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


def _target(hf_name: str, c: ModelConfig) -> Iterator[tuple[str | None, slice | None]]:
    """Where an HF tensor lands: (our parameter name, row slice inside a fused matrix or None)."""
    if hf_name.endswith("rotary_emb.inv_freq"):
        yield None, None
        return
    if hf_name == "model.embed_tokens.weight":
        yield "embed_tokens.weight", None
        return
    if hf_name == "model.norm.weight":
        yield "norm.weight", None
        return
    if hf_name == "lm_head.weight":
        yield (None if c.tie_word_embeddings else "lm_head.weight"), None
        return
    m = _LAYER.fullmatch(hf_name)
    if m is None:
        yield hf_name, None
        return
    i, rest = m.groups()
    q, kv, inter = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size
    fused = {
        "self_attn.q_proj": ("attn.qkv_proj", slice(0, q)),
        "self_attn.k_proj": ("attn.qkv_proj", slice(q, q + kv)),
        "self_attn.v_proj": ("attn.qkv_proj", slice(q + kv, q + 2 * kv)),
        "self_attn.o_proj": ("attn.o_proj", None),
        "mlp.gate_proj": ("mlp.gate_up_proj", slice(0, inter)),
        "mlp.up_proj": ("mlp.gate_up_proj", slice(inter, 2 * inter)),
        "mlp.down_proj": ("mlp.down_proj", None),
    }
    module, _, kind = rest.rpartition(".")
    if module in fused:
        name, rows = fused[module]
        yield f"layers.{i}.{name}.{kind}", rows
    else:
        yield f"layers.{i}.{rest}", None
