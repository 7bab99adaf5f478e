"""Decode steps replayed as CUDA graphs, one graph per batch-size bucket (vLLM's capture sizes).

A 135M model's decode step is a few hundred small kernels; launched one by one from Python, the
GPU waits on the host. A graph launches them all at once. Each bucket's graph reads its inputs from
static buffers, which a step fills (padded up to the bucket) before the replay.
"""

from __future__ import annotations

import bisect
import logging

import torch

from kubeinfer.worker.kernels.attention import AttentionMetadata, LayerKVCache
from kubeinfer.worker.kernels.backend import KernelBackend, StepInputs

log = logging.getLogger(__name__)


def capture_sizes(max_batch_size: int) -> list[int]:
    """vLLM's default batch sizes to capture: 1, 2, 4, then every 8 (every 16 from 256), up to
    ``max_batch_size`` (which is included, so every batch the scheduler can form has a bucket)."""
    sizes = [1, 2, 4] + list(range(8, 256, 8)) + list(range(256, max_batch_size + 1, 16))
    sizes = [s for s in sizes if s < max_batch_size]
    return sizes + [max_batch_size]


class DecodeGraphs:
    """Owns the captured graphs, their static input buffers and the shared memory pool.

    Invariants: the buffers are sized for the largest bucket; a padding row has slot -1 (its K/V is
    not written) and context length 0 (its attention output is zeros), so padding never touches
    the cache; ``run`` returns a view of the graph's output that is valid until the next replay.
    """

    @torch.inference_mode()  # the static buffers are inference tensors, written only in inference mode
    def __init__(self, model: torch.nn.Module, kv_caches: list[LayerKVCache], backend: KernelBackend,
                 max_batch_size: int, max_blocks_per_seq: int) -> None:
        if not backend.supports_cuda_graphs or backend.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the triton backend on a CUDA device, not {backend!r}")
        self.sizes = capture_sizes(max_batch_size)
        n, dev = self.sizes[-1], backend.device
        self.input_ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)
        self.slots = torch.full((n,), -1, dtype=torch.long, device=dev)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=dev)
        self.context_lens = torch.zeros(n, dtype=torch.int32, device=dev)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        pool = None
        # Largest first, so the smaller graphs reuse the largest one's memory from the shared pool.
        for size in reversed(self.sizes):
            meta = AttentionMetadata(self.slots[:size], size, None, None, [],
                                     block_tables=self.block_tables[:size], context_lens=self.context_lens[:size],
                                     max_query_len=1, max_seq_len=backend.max_seq_len)
            args = (self.input_ids[:size], self.positions[:size], kv_caches, meta)
            model(*args)  # warm-up: compiles the Triton kernels for these shapes outside the capture
            torch.cuda.synchronize(dev)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = model(*args)
            pool = graph.pool()
            self.graphs[size] = (graph, out)
        torch.cuda.synchronize(dev)
        log.info("captured CUDA graphs for decode batches of %s", self.sizes)

    @torch.inference_mode()
    def run(self, step: StepInputs) -> torch.Tensor | None:
        """Replay the bucket that fits this decode step; None when none does (run it eagerly)."""
        n = len(step.input_ids)
        i = bisect.bisect_left(self.sizes, n)
        if i == len(self.sizes):
            return None
        size = self.sizes[i]
        width = max(len(t) for t in step.seq_tables)
        tables = torch.tensor([t + [0] * (width - len(t)) for t in step.seq_tables], dtype=torch.int32)
        host = torch.tensor([step.input_ids, step.positions, step.slots, step.context_lens], dtype=torch.long)
        self.input_ids[:n].copy_(host[0], non_blocking=True)
        self.positions[:n].copy_(host[1], non_blocking=True)
        self.slots[:n].copy_(host[2], non_blocking=True)
        self.context_lens[:n].copy_(host[3], non_blocking=True)
        # Entries past a row's width are stale but never read: the kernels stop at the context length.
        self.block_tables[:n, :width].copy_(tables, non_blocking=True)
        if size > n:  # padding rows of an earlier, larger step must not write or read anything
            self.slots[n:size].fill_(-1)
            self.context_lens[n:size].zero_()
        graph, out = self.graphs[size]
        graph.replay()
        return out[:n]
