"""Compute kernels behind one dispatch point: a torch path for CPU (and reference), Triton on CUDA."""

from __future__ import annotations

import torch

from kubeinfer.worker.kernels.attention import AttentionMetadata, LayerKVCache, paged_attention, write_kv

ATTENTION_BACKENDS = ("auto", "torch", "triton")


def resolve_attention_backend(name: str, device: torch.device | str) -> str:
    """``auto`` is Triton on CUDA (when triton imports) and torch elsewhere; ``triton`` on a CPU runs
    the kernels in Triton's interpreter (TRITON_INTERPRET=1), which is how CI checks them."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {name!r}")
    if name != "auto":
        return name
    from kubeinfer.worker.kernels.triton_attention import triton_available
    return "triton" if triton_available(device) else "torch"


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerKVCache,
                      meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Write this step's K/V into the paged cache and attend: the one place that picks the kernel."""
    if meta.backend == "triton":
        from kubeinfer.worker.kernels.triton_attention import prefill_attention
        if cache.k_scale is not None:
            raise NotImplementedError("the int8 KV cache runs on the torch path only so far")
        return prefill_attention(q, k, v, cache.k, cache.v, meta.slot_mapping, meta.cu_seqlens_q,
                                 meta.context_lens, meta.block_tables, scale, meta.max_query_len,
                                 heads_first=True)
    write_kv(cache, k, v, meta.slot_mapping)
    return paged_attention(q, k, v, cache, meta, scale)
