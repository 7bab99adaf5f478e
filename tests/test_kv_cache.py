"""The block pool and KV-cache manager on their own: all-or-nothing allocation, ref counts, eviction."""

from __future__ import annotations

from kubeinfer.worker import SamplingParams
from kubeinfer.worker.kv_cache import BlockPool, KVCacheManager
from kubeinfer.worker.sequence import Sequence


def seq(request_id: str, tokens: list[int]) -> Sequence:
    return Sequence(request_id, list(tokens), SamplingParams())


def test_pool_allocation_is_all_or_nothing():
    pool = BlockPool(4)
    assert pool.allocate(5) is None and pool.num_free == 4
    blocks = pool.allocate(3)
    assert [b.ref_count for b in blocks] == [1, 1, 1] and pool.num_free == 1
    pool.release(blocks)
    assert pool.num_free == 4


def test_cached_blocks_are_evicted_last_and_lose_their_hash_when_reused():
    pool = BlockPool(3)
    a, b, c = pool.allocate(3)
    pool.register(a, 111)
    pool.release([a, b, c])
    assert pool.lookup(111) is a
    fresh = pool.allocate(2)
    assert a not in fresh          # uncached blocks are handed out first
    again = pool.allocate(1)
    assert again == [a] and a.block_hash is None and pool.lookup(111) is None


def test_shared_prefix_blocks_are_reference_counted():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    first = seq("a", list(range(10)))
    assert kv.allocate_slots(first, 10)
    first.num_computed_tokens = 10
    kv.cache_computed_blocks(first)      # two full blocks published, the partial third is not
    second = seq("b", list(range(8)) + [99, 98, 97])
    hits = kv.find_cached_prefix(second)
    assert len(hits) == 2
    assert kv.allocate_slots(second, 3, hits)
    assert kv.tables["b"][:2] == kv.tables["a"][:2] and hits[0].ref_count == 2
    kv.forget(first)
    assert hits[0].ref_count == 1
    kv.forget(second)
    assert kv.pool.num_free == 8 and kv.usage() == 0.0


def test_allocation_failure_changes_nothing():
    kv = KVCacheManager(num_blocks=2, block_size=4)
    s = seq("a", list(range(12)))
    assert not kv.allocate_slots(s, 12)
    assert kv.pool.num_free == 2 and "a" not in kv.tables


def test_router_prefix_keys_match_the_cache_hashes():
    """The router (which may not import torch) re-implements the chained block hash: keep them equal,
    or prefix-affinity routing would send prompts away from the replica that caches them."""
    from kubeinfer.router.policies import prefix_block_hashes
    kv = KVCacheManager(num_blocks=8, block_size=4)
    tokens = list(range(3, 40))
    assert prefix_block_hashes(tokens, 4, 100) == kv._full_block_hashes(seq("x", tokens), len(tokens))
