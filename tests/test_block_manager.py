"""Block manager: exact block ids on hit / miss / eviction, reference counts, version isolation."""

from __future__ import annotations

from dataclasses import dataclass, field

from open_autoglm.engine.block_manager import BlockManager


@dataclass
class Seq:
    request_id: str
    all_token_ids: list[int]
    version: str = "v1"
    block_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0


def run_prefill(bm: BlockManager, seq: Seq) -> list[int]:
    """Schedule the whole prompt (after any prefix hit) and mark it computed."""
    hits = bm.find_cached_prefix(seq)
    remaining = len(seq.all_token_ids) - len(hits) * bm.block_size
    assert bm.allocate(seq, remaining, hits)
    seq.num_computed_tokens = len(seq.all_token_ids)
    bm.cache_full_blocks(seq)
    return hits


def test_allocate_free_and_reference_counts():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = Seq("a", list(range(10)))  # 3 blocks
    assert run_prefill(bm, a) == []
    assert a.block_ids == [0, 1, 2]
    assert bm.ref_counts[:3] == [1, 1, 1] and bm.num_free_blocks == 5
    bm.free(a)
    assert a.block_ids == [] and bm.ref_counts[:3] == [0, 0, 0] and bm.num_free_blocks == 8


def test_prefix_hit_shares_blocks_and_counts_refs():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = Seq("a", list(range(10)))            # blocks 0,1 full; 2 partial
    run_prefill(bm, a)
    b = Seq("b", list(range(8)) + [99, 98])  # same first two blocks
    assert run_prefill(bm, b) == [0, 1]
    assert b.block_ids == [0, 1, 3]
    assert bm.ref_counts[:4] == [2, 2, 1, 1]
    assert b.num_computed_tokens == 10


def test_at_least_one_token_left_to_compute():
    bm = BlockManager(num_blocks=8, block_size=4)
    run_prefill(bm, Seq("a", list(range(8))))
    # An identical 8-token prompt may reuse only the first block: its last token must be computed.
    assert bm.find_cached_prefix(Seq("b", list(range(8)))) == [0]


def test_miss_when_an_earlier_block_differs():
    bm = BlockManager(num_blocks=8, block_size=4)
    run_prefill(bm, Seq("a", list(range(12))))
    # Block 1 holds the same tokens, but block 0 differs: the chained hash misses.
    assert bm.find_cached_prefix(Seq("b", [50, 51, 52, 53] + list(range(4, 12)))) == []


def test_free_cached_blocks_are_reused_then_evicted_lru():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = Seq("a", list(range(9)))  # blocks 0,1 full + 2 partial
    run_prefill(bm, a)
    bm.free(a)  # freed tail first: queue = 3, 2, 1, 0
    assert list(bm.free_queue) == [3, 2, 1, 0]
    b = Seq("b", list(range(8)) + [7])  # hits 0,1 (cached, free) without evicting them
    assert run_prefill(bm, b) == [0, 1]
    assert b.block_ids == [0, 1, 3]
    bm.free(b)
    assert list(bm.free_queue) == [2, 3, 1, 0]
    c = Seq("c", [200 + i for i in range(13)])  # needs 4 blocks: evicts everything, oldest first
    assert run_prefill(bm, c) == []
    assert c.block_ids == [2, 3, 1, 0]
    bm.free(c)
    assert bm.find_cached_prefix(Seq("d", list(range(9)))) == []  # a's blocks were evicted


def test_allocation_failure_changes_nothing():
    bm = BlockManager(num_blocks=2, block_size=4)
    a = Seq("a", list(range(12)))
    assert not bm.allocate(a, 12)
    assert a.block_ids == [] and bm.num_free_blocks == 2


def test_versions_never_share_blocks():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = Seq("a", list(range(9)), version="v1")
    run_prefill(bm, a)
    bm.free(a)
    assert bm.find_cached_prefix(Seq("b", list(range(9)), version="v2")) == []
    b = Seq("b", list(range(9)), version="v2")
    run_prefill(bm, b)
    assert b.block_ids == [3, 4, 5]  # fresh blocks; v1's cached 0 and 1 are left alone
    bm.free(b)
    # Both versions' blocks now sit in the cache, each found only under its own version.
    assert bm.find_cached_prefix(Seq("c", list(range(9)), version="v1")) == [0, 1]
    assert bm.find_cached_prefix(Seq("d", list(range(9)), version="v2")) == [3, 4]


def test_prefix_caching_off_never_hits():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    run_prefill(bm, Seq("a", list(range(9))))
    assert bm.find_cached_prefix(Seq("b", list(range(9)))) == []
