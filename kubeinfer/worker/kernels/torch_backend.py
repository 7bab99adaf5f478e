"""The torch backend: the reference kernels, on any device (and the CPU path where C++ cannot build)."""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from kubeinfer.worker.kernels.attention import (AttentionMetadata, LayerKVCache, PrefillChunk, gather_workspace_size,
                                                paged_attention, write_kv)
from kubeinfer.worker.kernels.backend import KernelBackend, StepInputs
from kubeinfer.worker.models.rope import apply_rotary
from kubeinfer.worker.sampling import first_max


# The reference ops, module-level so that a model built without a backend runs them too.
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, weight.shape, weight, eps)


def add_rms_norm_(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``residual += x`` in place, then the norm of the sum."""
    residual.add_(x)
    return F.rms_norm(residual, weight.shape, weight, eps)


def rotary_(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int) -> None:
    """Rotate the first ``num_heads`` heads of ``qkv [T, heads, d]`` in place."""
    qkv[:, :num_heads] = apply_rotary(qkv[:, :num_heads], cos, sin)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)


class TorchBackend(KernelBackend):
    """Reference kernels: torch ops for norms, rotary and SwiGLU; decode attention as one batched
    matmul over K/V gathered through the block tables (into grow-only workspaces, so steps stop
    allocating); prefill chunks through SDPA. Quantized linears: aten's weight-only CPU kernels
    where they take the shape, else dequantize-and-matmul. bf16 on a CPU: linears prepacked for
    oneDNN. Owns the gather workspaces.
    """

    name = "torch"

    rms_norm = staticmethod(rms_norm)
    add_rms_norm_ = staticmethod(add_rms_norm_)
    rotary_ = staticmethod(rotary_)
    silu_mul = staticmethod(silu_mul)
    greedy_argmax = staticmethod(first_max)

    def __init__(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 kv_int8: bool = False) -> None:
        super().__init__(device, dtype, kv_int8)
        self._workspaces: tuple[torch.Tensor, torch.Tensor] | None = None  # allocated by the first step

    # ---- model build ----------------------------------------------------------------------------

    def quantized_linear(self, scheme, state: Mapping[str, torch.Tensor], bias: torch.Tensor | None) -> nn.Module:
        from kubeinfer.worker.kernels import quant_linear as ql
        q = state["qweight"]
        on_cpu = q.device.type == "cpu"
        if scheme.name == "int8":
            n, k = q.shape
            cls = ql.AtenInt8Linear if on_cpu and ql.aten_int8_fits(k) else ql.Int8Linear
            return cls(q, state["scales"], bias)
        n, k = q.shape[0], 2 * q.shape[1]
        cls = ql.AtenInt4Linear if on_cpu and ql.aten_int4_fits(n, k, scheme.group_size) else ql.Int4Linear
        return cls(q, state["scales"], state["mins"], scheme.group_size, bias)

    def prepare_model(self, model: nn.Module) -> None:
        if self.dtype == torch.bfloat16 and self.device.type == "cpu" and self.pack_weights:
            # plain F.linear on a bf16 weight makes oneDNN reorder it on every call
            model.pack_bf16_weights(None)

    # ---- per step -------------------------------------------------------------------------------

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerKVCache,
                  meta: AttentionMetadata, scale: float) -> torch.Tensor:
        write_kv(cache, k, v, meta.slot_mapping)
        return paged_attention(q, k, v, cache, meta, scale)

    def attention_metadata(self, step: StepInputs, kv_caches: list[LayerKVCache]) -> AttentionMetadata:
        meta = self._common_metadata(step)
        nd = meta.num_decode_tokens
        if nd:
            width = meta.decode_block_tables.shape[1] * self.block_size
            lens = meta.decode_context_lens
            meta.decode_mask = (torch.arange(width, device=self.device).unsqueeze(0) >= lens.unsqueeze(1)) \
                .view(1, nd, 1, width)
        gathered = max([meta.decode_block_tables.numel() if nd else 0]
                       + [c.block_table.numel() for c in meta.prefills if c.mask is not None])
        if gathered:
            meta.key_workspace, meta.value_workspace = self._workspace(kv_caches[0].k, gathered)
        return meta

    def _common_metadata(self, step: StepInputs, masks: bool = True) -> AttentionMetadata:
        """Slots, decode tables and lengths, and the prefill chunks with their block tables and masks
        (without ``masks``, for a kernel that takes the step's own tables, the chunks' bounds only):
        what the torch and C++ paths share."""
        dev, bs = self.device, self.block_size
        nd = len(step.decode_tables)
        tables = lens = None
        if nd:
            width = max(len(t) for t in step.decode_tables)
            tables = torch.tensor([t + [0] * (width - len(t)) for t in step.decode_tables], dtype=torch.long)
            lens = torch.tensor(step.decode_lens, dtype=torch.long)
            tables, lens = tables.to(dev, non_blocking=True), lens.to(dev, non_blocking=True)
        prefills = []
        for start, end, first_pos, ctx, table in step.prefills:
            if not masks:
                prefills.append(PrefillChunk(start, end, ctx, None, None))
                continue
            mask = None
            if first_pos > 0:  # a later chunk, or a prefix-cache hit: attend to the cached keys too
                pos = torch.arange(first_pos, first_pos + end - start)
                mask = (torch.arange(ctx).unsqueeze(0) <= pos.unsqueeze(1)).to(dev, non_blocking=True)
            block_table = torch.tensor(table[: -(-ctx // bs)], dtype=torch.long).to(dev, non_blocking=True)
            prefills.append(PrefillChunk(start, end, ctx, block_table, mask))
        slots = torch.tensor(step.slots, dtype=torch.long).to(dev, non_blocking=True)
        return AttentionMetadata(slots, nd, tables, None, prefills, decode_context_lens=lens)

    def _workspace(self, cache: torch.Tensor, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Grow-only gather buffers for K and V, so steps stop allocating (and faulting in) fresh memory."""
        need = gather_workspace_size(cache, num_blocks)
        if self._workspaces is None or self._workspaces[0].numel() < need:
            need = int(need * 1.25)  # headroom: contexts grow a block at a time
            self._workspaces = (torch.empty(need, dtype=self.dtype, device=self.device),
                                torch.empty(need, dtype=self.dtype, device=self.device))
        return self._workspaces
