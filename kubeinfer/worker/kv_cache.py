"""Paged KV-cache bookkeeping: which physical blocks each sequence owns, and the prefix cache.

Only block *ids* live here; the K/V tensors belong to the model runner, indexed by these ids.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from kubeinfer.worker.sequence import Sequence


@dataclass(eq=False)
class Block:
    """One physical block of ``block_size`` token slots.

    ``block_hash`` is set once the block is full and its tokens are known to be in the cache; it
    identifies the whole prefix up to and including this block (parent hash + these tokens).
    """

    block_id: int
    ref_count: int = 0
    block_hash: int | None = None


class BlockPool:
    """A fixed set of blocks with a free list in eviction order and a content-hash map.

    Invariants: a block is in ``_free`` iff its ``ref_count`` is 0; the free list runs from the
    block to evict first (least recently freed) to the last; ``_cached`` maps a hash to a block
    whose ``block_hash`` equals it, whether in use or free. Handing a free block out evicts its
    hash, so a cached block is only reused for different content once nothing else is free.
    """

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV pool needs at least one block, got {num_blocks}")
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.enable_caching = enable_caching
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[int, Block] = {}

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def lookup(self, block_hash: int) -> Block | None:
        return self._cached.get(block_hash) if self.enable_caching else None

    def take(self, blocks: list[Block]) -> None:
        """Add a reference to cached blocks being shared by another sequence."""
        for b in blocks:
            if b.ref_count == 0:
                del self._free[b.block_id]
            b.ref_count += 1

    def allocate(self, n: int) -> list[Block] | None:
        """Hand out ``n`` fresh blocks, or None (and nothing changes) if fewer are free."""
        if n > len(self._free):
            return None
        out = []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            b = self.blocks[block_id]
            if b.block_hash is not None:
                if self._cached.get(b.block_hash) is b:
                    del self._cached[b.block_hash]
                b.block_hash = None
            b.ref_count = 1
            out.append(b)
        return out

    def release(self, blocks: list[Block]) -> None:
        """Drop one reference from each block; blocks reaching zero become evictable.

        Released in reverse so a sequence's tail blocks are evicted before its head: heads are the
        prefixes most likely to be shared.
        """
        for b in reversed(blocks):
            b.ref_count -= 1
            if b.ref_count == 0:
                if b.block_hash is None or not self.enable_caching:
                    self._free[b.block_id] = None
                    self._free.move_to_end(b.block_id, last=False)  # uncached: reuse first
                else:
                    self._free[b.block_id] = None

    def register(self, block: Block, block_hash: int) -> None:
        if not self.enable_caching or block.block_hash is not None:
            return
        block.block_hash = block_hash
        self._cached.setdefault(block_hash, block)


class KVCacheManager:
    """Maps each sequence to its block table and shares full prompt blocks through the prefix cache.

    Invariants: a sequence's table holds exactly ``ceil(slots needed / block_size)`` blocks after a
    successful ``allocate_slots``; allocation is all-or-nothing (it returns False and changes nothing
    when the pool cannot cover the request); every block of a live table holds a reference.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.tables: dict[str, list[Block]] = {}
        self._hashes: dict[str, list[int]] = {}
        self._num_published: dict[str, int] = {}   # leading blocks of each table already in the cache
        self.prefix_cache_queries = 0    # prompt tokens of the requests admitted (record_prefix_lookup)
        self.prefix_cache_hits = 0       # of which served from the cache

    @property
    def enable_prefix_caching(self) -> bool:
        return self.pool.enable_caching

    def usage(self) -> float:
        """Fraction of blocks held by live sequences (free-but-cached blocks count as free)."""
        return 1.0 - self.pool.num_free / self.pool.num_blocks

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.tables.get(request_id, ())]

    def _full_block_hashes(self, seq: Sequence, num_tokens: int) -> list[int]:
        """Chained hashes of the first ``num_tokens // block_size`` blocks, extended incrementally."""
        hashes = self._hashes.setdefault(seq.request_id, [])
        bs = self.block_size
        for i in range(len(hashes), num_tokens // bs):
            parent = hashes[-1] if hashes else -1  # ints hash the same in every process; None does not
            hashes.append(hash((parent, tuple(seq.token_ids[i * bs:(i + 1) * bs]))))
        return hashes

    def find_cached_prefix(self, seq: Sequence) -> list[Block]:
        """The longest run of cached blocks matching the start of ``seq``.

        At least one token is always left to compute, because the last prompt position must run
        through the model to produce logits.
        """
        if not self.enable_prefix_caching:
            return []
        hashes = self._full_block_hashes(seq, len(seq) - 1)
        hits: list[Block] = []
        for h in hashes:
            b = self.pool.lookup(h)
            if b is None:
                break
            hits.append(b)
        return hits

    def record_prefix_lookup(self, num_prompt_tokens: int, num_hit_tokens: int) -> None:
        """Count one admitted request's prefix-cache lookup, in tokens (vLLM's meaning). The scheduler
        calls it once per request, when it is first admitted: a request that waits is looked up again
        every step, and counting those lookups would inflate both counters."""
        if self.enable_prefix_caching:
            self.prefix_cache_queries += num_prompt_tokens
            self.prefix_cache_hits += num_hit_tokens

    def allocate_slots(self, seq: Sequence, num_new_tokens: int, cached: list[Block] = ()) -> bool:
        """Make room for ``num_new_tokens`` more tokens after ``seq.num_computed_tokens``.

        ``cached`` (only for a sequence not yet holding blocks) are prefix-cache hits to share;
        the tokens they hold count as computed.
        """
        table = self.tables.get(seq.request_id, [])
        computed = seq.num_computed_tokens + len(cached) * self.block_size
        needed = -(-(computed + num_new_tokens) // self.block_size) - len(table) - len(cached)
        # Hits sitting in the free list stop being free once shared: count them against the budget.
        free_hits = sum(1 for b in cached if b.ref_count == 0)
        if needed > self.pool.num_free - free_hits:
            return False
        self.pool.take(list(cached))
        fresh = self.pool.allocate(max(needed, 0)) or []
        self.tables[seq.request_id] = table + list(cached) + fresh
        return True

    def cache_computed_blocks(self, seq: Sequence) -> None:
        """Publish the blocks that ``seq`` has completely filled, so later prompts can share them."""
        if not self.enable_prefix_caching:
            return
        table = self.tables.get(seq.request_id)
        if not table:
            return
        start = self._num_published.get(seq.request_id, 0)
        # The hash list may run ahead (prefix lookups hash the whole prompt): only blocks whose
        # every slot has been written may be published.
        full = seq.num_computed_tokens // self.block_size
        hashes = self._full_block_hashes(seq, seq.num_computed_tokens)
        for i in range(start, full):
            self.pool.register(table[i], hashes[i])
        self._num_published[seq.request_id] = max(start, full)

    def trim(self, seq: Sequence) -> None:
        """Release the blocks past those ``seq``'s tokens need (the slots of drafts a verification
        step rejected): afterwards the table holds ``ceil(len(seq) / block_size)`` blocks."""
        table = self.tables.get(seq.request_id)
        keep = -(-len(seq) // self.block_size)
        if table and len(table) > keep:
            self.pool.release(table[keep:])
            del table[keep:]

    def free(self, seq: Sequence) -> None:
        """Release every block of ``seq`` (finished, aborted or preempted)."""
        table = self.tables.pop(seq.request_id, None)
        self._num_published.pop(seq.request_id, None)
        if table:
            self.pool.release(table)

    def forget(self, seq: Sequence) -> None:
        """Drop all state of a finished sequence."""
        self.free(seq)
        self._hashes.pop(seq.request_id, None)
