"""Turns a scheduled batch into model inputs, runs the forward pass and samples."""

from __future__ import annotations

import torch

from kubeinfer.worker.kernels.cpu import load_cpu_kernels
from kubeinfer.worker.kernels.attention import AttentionMetadata, LayerKVCache, PrefillChunk, gather_workspace_size
from kubeinfer.worker.models.config import ModelConfig
from kubeinfer.worker.models.llama import LlamaForCausalLM
from kubeinfer.worker.sampling import Sampler, SamplerOutput, SamplingBatch
from kubeinfer.worker.scheduler import ScheduledBatch


class ModelRunner:
    """Owns the model, the paged K/V tensors and the sampler.

    The caches are one ``[kv_heads, num_blocks, block_size, head_dim]`` tensor per layer for K and
    for V (see kernels/attention.py for why heads come first), preallocated once; block ids come from
    the KVCacheManager.
    """

    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int, dtype: torch.dtype,
                 kv_int8: bool = False, attention_backend: str = "torch", compile_decode: bool = False) -> None:
        c = model.config
        self.model = model
        kernels = load_cpu_kernels() if attention_backend == "cpp" else None
        if dtype == torch.bfloat16 and not compile_decode:
            # CPU only; AMX tiles on the cpp backend where the CPU has them, else oneDNN's layout,
            # and a no-op where neither can pack.
            model.pack_bf16_weights(kernels)
        # Only decode-only steps are compiled: they always take the same path (no prefill chunks),
        # so one dynamic-shape graph serves every batch size and context length.
        self._decode_forward = torch.compile(model.forward, dynamic=True) if compile_decode else model.forward
        self.block_size = block_size
        self.vocab_size = c.vocab_size
        shape = (c.num_kv_heads, num_blocks, block_size, c.head_dim)
        if kv_int8:
            self.kv_caches = [LayerKVCache(torch.zeros(shape, dtype=torch.int8), torch.zeros(shape, dtype=torch.int8),
                                           torch.zeros(shape[:-1]), torch.zeros(shape[:-1]))
                              for _ in range(c.num_layers)]
        else:
            self.kv_caches = [LayerKVCache(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))
                              for _ in range(c.num_layers)]
        self.attention_backend = attention_backend
        self.sampler = Sampler(kernels)
        if kernels is not None:
            model.use_cpu_kernels(kernels)
        self._workspaces = (torch.empty(0, dtype=dtype), torch.empty(0, dtype=dtype))

    def _workspace(self, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Grow-only gather buffers for K and V, so steps stop allocating (and faulting in) fresh memory."""
        need = gather_workspace_size(self.kv_caches[0].k, num_blocks)
        if self._workspaces[0].numel() < need:
            need = int(need * 1.25)  # headroom: contexts grow a block at a time
            self._workspaces = (torch.empty(need, dtype=self._workspaces[0].dtype),
                                torch.empty(need, dtype=self._workspaces[0].dtype))
        return self._workspaces

    def prepare(self, batch: ScheduledBatch, block_tables: list[list[int]]):
        """Flatten the batch: token ids, positions, slots and attention metadata (decodes first)."""
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        prefills: list[PrefillChunk] = []
        sample_rows: list[int] = []
        for seq, n, table in zip(batch.seqs, batch.num_new_tokens, block_tables):
            start = seq.num_computed_tokens
            if n == 1:
                input_ids.append(seq.token_ids[start])
                positions.append(start)
                slots.append(table[start // bs] * bs + start % bs)
                decode_tables.append(table)
                decode_lens.append(start + 1)
            else:
                offset = len(input_ids)
                input_ids.extend(seq.token_ids[start:start + n])
                pos = torch.arange(start, start + n)
                table_t = torch.tensor(table, dtype=torch.long)
                positions.extend(range(start, start + n))
                slots.extend((table_t[pos // bs] * bs + pos % bs).tolist())
                ctx = start + n
                mask = None
                if start > 0:  # a later chunk, or a prefix-cache hit: attend to the cached keys too
                    mask = torch.arange(ctx).unsqueeze(0) <= pos.unsqueeze(1)
                prefills.append(PrefillChunk(offset, offset + n, ctx, table_t[: -(-ctx // bs)], mask))
            if start + n == len(seq):
                sample_rows.append(len(input_ids) - 1)
        nd = len(decode_tables)
        dec_tables = dec_mask = lens = None
        # The cpp decode kernel reads the cache through the tables itself: no mask, no gather buffer.
        torch_decode = nd and self.attention_backend != "cpp"
        if nd:
            width = max(len(t) for t in decode_tables)
            dec_tables = torch.tensor([t + [0] * (width - len(t)) for t in decode_tables], dtype=torch.long)
            lens = torch.tensor(decode_lens, dtype=torch.long)
            if torch_decode:
                dec_mask = (torch.arange(width * bs).unsqueeze(0) >= lens.unsqueeze(1)).view(1, nd, 1, width * bs)
        gathered = max([dec_tables.numel() if torch_decode else 0]
                       + [c.block_table.numel() for c in prefills if c.mask is not None])
        k_ws, v_ws = self._workspace(gathered) if gathered else (None, None)
        meta = AttentionMetadata(torch.tensor(slots, dtype=torch.long), nd, dec_tables, dec_mask, prefills,
                                 k_ws, v_ws, backend=self.attention_backend, decode_context_lens=lens)
        if self.attention_backend == "triton":
            self._add_chunk_metadata(meta, batch, block_tables)
        return (torch.tensor(input_ids, dtype=torch.long), torch.tensor(positions, dtype=torch.long),
                meta, torch.tensor(sample_rows, dtype=torch.long))

    @staticmethod
    def _add_chunk_metadata(meta: AttentionMetadata, batch: ScheduledBatch, block_tables: list[list[int]]) -> None:
        """The Triton kernels' view of the batch: every sequence is one query chunk, decodes included."""
        lens = batch.num_new_tokens
        width = max(len(t) for t in block_tables)
        meta.cu_seqlens_q = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        meta.context_lens = torch.tensor([s.num_computed_tokens + n for s, n in zip(batch.seqs, lens)],
                                         dtype=torch.int32)
        meta.block_tables = torch.tensor([t + [0] * (width - len(t)) for t in block_tables], dtype=torch.int32)
        meta.max_query_len = max(lens)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, block_tables: list[list[int]],
                sampling: SamplingBatch | None) -> SamplerOutput | None:
        """Run the forward pass; sample one token for each sequence whose prompt is now complete."""
        input_ids, positions, meta, sample_rows = self.prepare(batch, block_tables)
        forward = self.model if meta.prefills else self._decode_forward
        hidden = forward(input_ids, positions, self.kv_caches, meta)
        if sampling is None or len(sample_rows) == 0:
            return None
        # A plain-greedy step takes its argmax of the head's own output: widening [B, vocab] bf16
        # logits to fp32 cost ~1 ms a step at 64 rows.
        logits = self.model.compute_logits(hidden[sample_rows], widen=not sampling.plain_greedy)
        return self.sampler(logits, sampling)
