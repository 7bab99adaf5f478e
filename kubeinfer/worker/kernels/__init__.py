"""Compute kernels behind one dispatch point: a torch path for CPU (and reference), Triton on CUDA."""

from __future__ import annotations

import torch

from kubeinfer.worker.kernels.cpu import load_cpu_kernels
from kubeinfer.worker.kernels.attention import AttentionMetadata, LayerKVCache, paged_attention, write_kv

ATTENTION_BACKENDS = ("auto", "torch", "cpp", "triton")
_CPP_DTYPES = (torch.float32, torch.bfloat16)


def resolve_attention_backend(name: str, device: torch.device | str, dtype: torch.dtype = torch.float32,
                              kv_int8: bool = False, compile_decode: bool = False) -> str:
    """Pick the kernels for this engine.

    ``auto`` is Triton on CUDA (when triton imports); on a CPU it is ``cpp`` (the C++ decode kernels
    of cpu_kernels.cpp) when they apply and build, else torch. ``cpp`` covers an fp32 or bf16 model
    with a KV cache of the model's dtype and eager decode steps (a compiled graph fuses the torch ops
    itself). ``triton`` on a CPU runs the kernels in Triton's interpreter (TRITON_INTERPRET=1), which
    is how CI checks them.
    """
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {name!r}")
    if name == "auto":
        from kubeinfer.worker.kernels.triton_attention import triton_available
        if triton_available(device):
            return "triton"
        if torch.device(device).type != "cpu" or dtype not in _CPP_DTYPES or kv_int8 or compile_decode:
            return "torch"
        return "cpp" if load_cpu_kernels() is not None else "torch"
    if name == "cpp":
        if dtype not in _CPP_DTYPES or kv_int8 or compile_decode:
            raise ValueError("attention_backend='cpp' needs dtype float32 or bfloat16, a KV cache of that dtype "
                             "(not int8) and compile off")
        if load_cpu_kernels() is None:
            raise ValueError("attention_backend='cpp': the C++ CPU kernels could not be built here (see the log)")
    return name


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
    if meta.backend == "cpp":
        load_cpu_kernels().write_kv(k, v, cache.k, cache.v, meta.slot_mapping)
    else:
        write_kv(cache, k, v, meta.slot_mapping)
    return paged_attention(q, k, v, cache, meta, scale)
