"""Sizing the KV pool on a GPU as vLLM does: what is left of ``gpu_memory_utilization`` of the device
after the weights, a profiled forward pass's activation peak and the memory outside torch's allocator.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from kubeinfer.worker.kernels.backend import KernelBackend, StepInputs

log = logging.getLogger(__name__)
GIB = 1 << 30


@dataclass(frozen=True)
class MemoryProfile:
    """Bytes on the device: its total, what ``gpu_memory_utilization`` allows, the weights (torch's
    allocations before the profile), the profiled forward's activation peak above them, and the
    device memory used outside torch's allocator (CUDA context, cuBLAS and Triton workspaces, and any
    other process: counted against us, on the side of caution)."""

    total: int
    budget: int
    weights: int
    activation_peak: int
    non_torch: int
    free_after: int

    @property
    def kv_cache_bytes(self) -> int:
        left = self.budget - self.weights - self.activation_peak - self.non_torch
        # Never more than is actually free, less room for the activations the pool must leave.
        return max(0, min(left, self.free_after - self.activation_peak))


def check_free_memory(device: torch.device, utilization: float) -> None:
    """Fail at start (not mid-load) when other processes hold so much of the device that
    ``utilization`` of it cannot be ours."""
    free, total = torch.cuda.mem_get_info(device)
    if free < utilization * total * 0.98:  # a little slack: our own CUDA context is in "used" already
        raise ValueError(f"{device}: only {free / GIB:.1f} GiB of the device's {total / GIB:.1f} GiB is free, "
                         f"less than gpu_memory_utilization={utilization} asks for; lower it, or free the GPU")


@torch.inference_mode()
def profile_memory(model: torch.nn.Module, backend: KernelBackend, *, num_tokens: int, num_sample_rows: int,
                   block_size: int, max_model_len: int, kv_int8: bool, utilization: float) -> MemoryProfile:
    """Run one forward at the largest step (``num_tokens`` prompt tokens from position 0) and the
    sampler's largest logits, and measure what it took. The dummy step writes into a scratch cache
    just large enough for it, whose bytes are not counted as activations."""
    from kubeinfer.worker.model_runner import allocate_kv_caches
    dev = backend.device
    torch.cuda.synchronize(dev)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    weights = torch.cuda.memory_allocated(dev)
    nb = -(-num_tokens // block_size)
    caches = allocate_kv_caches(model.config, nb, block_size, backend.dtype, kv_int8, dev)
    scratch = sum(t.numel() * t.element_size() for c in caches for t in c if t is not None)
    table = list(range(nb))
    step = StepInputs(input_ids=[0] * num_tokens, positions=list(range(num_tokens)), slots=list(range(num_tokens)),
                      prefills=[(0, num_tokens, 0, num_tokens, table)], sample_rows=[num_tokens - 1],
                      seq_tables=[table], query_lens=[num_tokens], context_lens=[num_tokens])
    backend.configure_cache(block_size, max_model_len)
    meta = backend.attention_metadata(step, caches)
    ids = torch.zeros(num_tokens, dtype=torch.long, device=dev)
    positions = torch.arange(num_tokens, device=dev)
    hidden = model(ids, positions, caches, meta)
    logits = model.compute_logits(hidden[-min(num_sample_rows, num_tokens):])
    logits.softmax(dim=-1).sort(dim=-1)  # the sampler's widest work: probabilities and a full ranking
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev) - weights - scratch
    del caches, hidden, logits, meta
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(dev)
    non_torch = (total - free) - torch.cuda.memory_reserved(dev)
    return MemoryProfile(total=total, budget=int(utilization * total), weights=weights,
                         activation_peak=max(peak, 0), non_torch=max(non_torch, 0), free_after=free)
