"""The Triton backend: the CUDA path (and, under TRITON_INTERPRET=1, the same kernels on a CPU)."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from kubeinfer.worker.kernels import torch_backend as ref
from kubeinfer.worker.kernels.attention import AttentionMetadata, LayerKVCache, PrefillChunk
from kubeinfer.worker.kernels.backend import KernelBackend, StepInputs


class TritonBackend(KernelBackend):
    """Paged attention, K/V writes (quantizing on write for an int8 cache) and W8A16 / W4A16 matmuls
    as Triton kernels; norms, rotary and SwiGLU as Triton kernels where kernels/triton_norm.py
    provides them, else torch's ops (on CUDA each is one fused kernel, and CUDA graphs remove their
    launch cost). Float linears are cuBLAS through ``nn.Linear``; the greedy argmax stays on the
    device.

    A step of decodes only runs the decode kernel (split over the context when few sequences run:
    ``max_seq_len`` bounds its grid from the host), which reads nothing from the host, so such steps
    can be captured as CUDA graphs. A step with prefill chunks runs one chunked-prefill launch over
    every sequence (a decode is a chunk of one).
    """

    name = "triton"
    supports_cuda_graphs = True

    def __init__(self, device: torch.device | str = "cuda", dtype: torch.dtype = torch.float16,
                 kv_int8: bool = False) -> None:
        super().__init__(device, dtype, kv_int8)
        from kubeinfer.worker.kernels import triton_attention
        self._attn = triton_attention
        try:
            from kubeinfer.worker.kernels import triton_norm
        except ImportError:
            triton_norm = None
        if triton_norm is not None:
            self.rms_norm = triton_norm.rms_norm
            self.add_rms_norm_ = triton_norm.add_rms_norm_
            self.rotary_ = triton_norm.rotary_
            self.silu_mul = triton_norm.silu_mul
        else:
            self.rms_norm, self.add_rms_norm_ = ref.rms_norm, ref.add_rms_norm_
            self.rotary_, self.silu_mul = ref.rotary_, ref.silu_mul
        self.greedy_argmax = ref.first_max

    def quantized_linear(self, scheme, state: Mapping[str, torch.Tensor], bias: torch.Tensor | None) -> nn.Module:
        from kubeinfer.worker.kernels import quant_linear as ql
        if scheme.name == "int8":
            return ql.TritonInt8Linear(state["qweight"], state["scales"], bias)
        return ql.TritonInt4Linear(state["qweight"], state["scales"], state["mins"], scheme.group_size, bias)

    def prepare_model(self, model: nn.Module) -> None:
        """Nothing to pack: the Triton matmuls read the canonical quantized state."""

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerKVCache,
                  meta: AttentionMetadata, scale: float) -> torch.Tensor:
        scales = {"k_scales": cache.k_scale, "v_scales": cache.v_scale} if cache.k_scale is not None else {}
        if meta.decode_only:
            self._attn.write_kv_cache(k, v, cache.k, cache.v, meta.slot_mapping, heads_first=True, **scales)
            return self._attn.paged_decode_attention(q, cache.k, cache.v, meta.block_tables, meta.context_lens,
                                                     scale, heads_first=True, max_seq_len=meta.max_seq_len,
                                                     **scales)
        return self._attn.prefill_attention(q, k, v, cache.k, cache.v, meta.slot_mapping, meta.cu_seqlens_q,
                                            meta.context_lens, meta.block_tables, scale, meta.max_query_len,
                                            heads_first=True, **scales)

    def attention_metadata(self, step: StepInputs, kv_caches: list[LayerKVCache]) -> AttentionMetadata:
        dev = self.device
        tables, context_lens, cu = step.query_chunks(torch.int32)
        meta = AttentionMetadata(
            torch.tensor(step.slots, dtype=torch.long).to(dev, non_blocking=True), len(step.decode_tables),
            None, None, [PrefillChunk(start, end, ctx, None, None) for start, end, _, ctx, _ in step.prefills],
            block_tables=tables.to(dev, non_blocking=True), context_lens=context_lens.to(dev, non_blocking=True),
            max_query_len=max(step.query_lens), max_seq_len=self.max_seq_len)
        if not meta.decode_only:
            meta.cu_seqlens_q = cu.to(dev, non_blocking=True)
        return meta
