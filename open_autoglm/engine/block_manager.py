"""Paged KV-cache bookkeeping: block allocation, reference counts and the prefix cache.

Plain Python (no torch). A block holds `block_size` tokens of KV for every layer.

    block state    | ref_count | in free queue | has hash (cached)
    in use         |   >= 1    |      no       | if full and computed
    free, cached   |     0     |  yes (LRU)    | yes: reusable on a prefix hit
    free, empty    |     0     |     yes       | no

Prefix caching: full blocks are identified by a chained hash
    h_i = H(h_{i-1}, tokens of block i),   h_{-1} = H(weights version)
so a block matches only if every earlier token matches too, and KV computed under one weights
version is never found under another. Free blocks are taken from the front of the free queue
(least recently freed first); a cached block is evicted only when it is taken.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from typing import Protocol

import xxhash


class _Seq(Protocol):
    request_id: str
    version: str  # weights version the sequence's KV is computed under
    block_ids: list[int]
    num_computed_tokens: int

    @property
    def all_token_ids(self) -> list[int]: ...


def hash_block(parent: bytes, token_ids: list[int]) -> bytes:
    return xxhash.xxh3_128_digest(parent + array("q", token_ids).tobytes())


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[bytes, int] = {}            # block hash -> block id
        self.seq_hashes: dict[str, list[bytes]] = {}  # request id -> hashes of its full blocks
        self.num_registered: dict[str, int] = {}     # request id -> its blocks already in `cached`
        self.num_queries = 0  # prefix-cache lookups (tokens asked for), for metrics
        self.num_hits = 0     # tokens found

    # -- queries ------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks if self.num_blocks else 0.0

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_cached_prefix(self, seq: _Seq) -> list[int]:
        """Block ids holding the longest cached prefix of `seq` (not yet referenced).

        At least one token is always left to compute, so the last position gets logits."""
        if not self.enable_prefix_caching:
            return []
        token_ids = seq.all_token_ids
        max_blocks = (len(token_ids) - 1) // self.block_size
        hashes = self._full_block_hashes(seq, token_ids, max_blocks)
        hits: list[int] = []
        for h in hashes[:max_blocks]:
            block_id = self.cached.get(h)
            if block_id is None:
                break
            hits.append(block_id)
        self.num_queries += len(token_ids)
        self.num_hits += len(hits) * self.block_size
        return hits

    # -- changes ------------------------------------------------------------------------------
    def allocate(self, seq: _Seq, num_new_tokens: int, cached_blocks: list[int] = ()) -> bool:
        """Make room for `num_new_tokens` more tokens of `seq` beyond its computed ones, first
        taking `cached_blocks` (a prefix hit). False, with nothing changed, if blocks run out."""
        num_cached_tokens = len(cached_blocks) * self.block_size
        total = seq.num_computed_tokens + num_cached_tokens + num_new_tokens
        num_new_blocks = self.blocks_needed(total) - len(seq.block_ids) - len(cached_blocks)
        reusable = sum(1 for b in cached_blocks if self.ref_counts[b] == 0)  # they leave the free queue
        if num_new_blocks > self.num_free_blocks - reusable:
            return False
        for block_id in cached_blocks:
            if self.ref_counts[block_id] == 0:
                del self.free_queue[block_id]
            self.ref_counts[block_id] += 1
        seq.block_ids.extend(cached_blocks)
        seq.num_computed_tokens += num_cached_tokens
        for _ in range(max(num_new_blocks, 0)):
            seq.block_ids.append(self._take_free_block())
        return True

    def cache_full_blocks(self, seq: _Seq) -> None:
        """Register the blocks of `seq` that are full and computed, so later requests can hit them."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        start = self.num_registered.get(seq.request_id, 0)
        if num_full <= start:  # the common decode step: no block filled up
            return
        hashes = self._full_block_hashes(seq, seq.all_token_ids, num_full)
        self.num_registered[seq.request_id] = num_full
        for i in range(start, num_full):
            block_id = seq.block_ids[i]
            if self.block_hash[block_id] is None:
                self.block_hash[block_id] = hashes[i]
                self.cached.setdefault(hashes[i], block_id)

    def free(self, seq: _Seq) -> None:
        """Drop `seq`'s references. Blocks reaching zero join the free queue tail-first, so a
        sequence's last blocks (least likely shared) are evicted before its first ones."""
        for block_id in reversed(seq.block_ids):
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                self.free_queue[block_id] = None
        seq.block_ids = []
        self.seq_hashes.pop(seq.request_id, None)
        self.num_registered.pop(seq.request_id, None)

    def forget_hashes(self, seq: _Seq) -> None:
        """Call when `seq` moves to another weights version (its KV will be recomputed)."""
        self.seq_hashes.pop(seq.request_id, None)
        self.num_registered.pop(seq.request_id, None)

    def reset_prefix_cache(self) -> None:
        """Forget every cached block that nobody references (e.g. after a weights update)."""
        for block_id in self.free_queue:
            self._evict(block_id)

    # -- internals ----------------------------------------------------------------------------
    def _take_free_block(self) -> int:
        block_id, _ = self.free_queue.popitem(last=False)
        self._evict(block_id)
        self.ref_counts[block_id] = 1
        return block_id

    def _evict(self, block_id: int) -> None:
        h = self.block_hash[block_id]
        if h is not None:
            if self.cached.get(h) == block_id:
                del self.cached[h]
            self.block_hash[block_id] = None

    def _full_block_hashes(self, seq: _Seq, token_ids: list[int], num_blocks: int) -> list[bytes]:
        """Chained hashes of the first `num_blocks` full blocks, extending the memo per request."""
        hashes = self.seq_hashes.setdefault(seq.request_id, [])
        while len(hashes) < num_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else root_hash(seq.version)
            hashes.append(hash_block(parent, token_ids[i * self.block_size:(i + 1) * self.block_size]))
        return hashes


def root_hash(version: str) -> bytes:
    """The chain's seed: the weights version, so KV of one version never matches another."""
    return xxhash.xxh3_128_digest(b"weights:" + version.encode())
