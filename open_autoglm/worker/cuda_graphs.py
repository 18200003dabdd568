"""CUDA graphs for decode steps: one graph per batch-size bucket, sharing one memory pool.

A decode step of B sequences replays the graph of the smallest bucket >= B. Its inputs go
straight from pinned host memory into the static buffers the graph reads, padding included:

    row        | input_id | position | slot | seq_len | block_table
    real (< B) |  token   |   pos    | slot |  len    |  its blocks
    pad (>= B) |    0     |    0     |  -1  |   0     |  zeros       <- slot -1: KV write skipped;
                                                                         seq_len 0: attention yields 0

    static64 = [input_ids | positions | slots | seq_lens] of the bucket, rows 16-byte aligned (Triton
               compiles a variant per pointer alignment): one host->device copy per step
    block_tables (int32): uploaded only when they changed since this bucket's last step (a decode
               step adds a block to a sequence once every block_size steps)

The graph computes logits in float32 (the sampler's dtype), so no cast runs outside it.
Parameters and KV caches live at fixed addresses, so graphs stay valid across weight updates.
"""

from __future__ import annotations

import logging
import time

import torch

from open_autoglm.attention.base import AttentionMetadata
from open_autoglm.worker.inputs import HostInputs

logger = logging.getLogger(__name__)


def _even(n: int) -> int:
    return n + n % 2  # int64 rows of an even length start 16-byte aligned


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to max_batch (vLLM-like spacing: little padding waste)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16)) + [max_batch]
    return sorted(set(sizes))


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, kv_caches, max_batch: int, max_blocks_per_seq: int,
                 max_seq_len: int, device: torch.device) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.max_seq_len = max_seq_len
        self.device = device
        self.buckets = batch_buckets(max_batch)
        size = self.buckets[-1]
        self.static64 = torch.zeros(4 * _even(size), dtype=torch.long, device=device)  # a bucket: [:4 * _even(b)]
        self.block_tables = torch.zeros(size, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.last_tables = None  # (bucket, host tables) of the last upload
        self.query_start_loc = torch.arange(size + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.capture_seconds = 0.0

    def _inputs(self, batch: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        ids, positions, slots, seq_lens = self.static64[:4 * _even(batch)].view(4, _even(batch))[:, :batch]
        meta = AttentionMetadata(
            slot_mapping=slots, query_start_loc=self.query_start_loc[:batch + 1],
            seq_lens=seq_lens, block_tables=self.block_tables[:batch],
            query_lens_cpu=[1] * batch, seq_lens_cpu=[self.max_seq_len] * batch,
            max_query_len=1, max_seq_len=self.max_seq_len,
        )
        return ids, positions, meta

    def _forward(self, batch: int) -> torch.Tensor:
        ids, positions, meta = self._inputs(batch)
        hidden = self.model(ids, positions, self.kv_caches, meta)
        return self.model.compute_logits(hidden).float()

    @torch.inference_mode()
    def capture(self) -> float:
        """Capture every bucket, largest first (later, smaller graphs reuse the pool's memory)."""
        start = time.perf_counter()
        pool = None
        for batch in reversed(self.buckets):
            self._inputs(batch)[2].slot_mapping.fill_(-1)  # capture-time forwards write nowhere
            self._forward(batch)  # warm-up: compiles kernels, settles the allocator
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[batch] = self._forward(batch)
            pool = graph.pool() if pool is None else pool
            self.graphs[batch] = graph
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - start
        logger.info("captured %d decode CUDA graphs (batch 1..%d) in %.2fs",
                    len(self.buckets), self.buckets[-1], self.capture_seconds)
        return self.capture_seconds

    def _upload_tables(self, bucket: int, tables) -> None:
        last = self.last_tables
        if last is not None and last[0] == bucket and last[1].shape == tables.shape and (last[1] == tables).all():
            return
        batch, width = tables.shape
        host = torch.zeros((bucket, width), dtype=torch.int32, pin_memory=True)
        host.numpy()[:batch] = tables
        self.block_tables[:bucket, :width].copy_(host, non_blocking=True)
        self.last_tables = (bucket, tables)

    def can_run(self, h: HostInputs) -> bool:
        return h.is_decode_only and h.num_seqs <= self.buckets[-1]

    def run(self, h: HostInputs, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 logits [S, V] of a decode step (S = rows that sample, usually all B); input_ids
        [B] on the device replace the host's ids (a step launched before its ids reached the host)."""
        batch = h.num_seqs
        bucket = next(b for b in self.buckets if b >= batch)
        host64 = torch.zeros(4 * _even(bucket), dtype=torch.long, pin_memory=True)
        a = host64.numpy().reshape(4, _even(bucket))
        a[0, :batch] = h.input_ids
        a[1, :batch] = h.positions
        a[2, :batch] = h.slots
        a[2, batch:bucket] = -1
        a[3, :batch] = h.seq_lens
        self.static64[:4 * _even(bucket)].copy_(host64, non_blocking=True)
        if input_ids is not None:
            self.static64[:batch].copy_(input_ids)
        self._upload_tables(bucket, h.block_tables)
        self.graphs[bucket].replay()
        logits = self.outputs[bucket]
        if h.samples_every_row:
            return logits[:batch]
        rows = torch.tensor(h.logits_indices, dtype=torch.long, device=self.device)
        return logits[rows]  # a 1-token prefill chunk that does not reach the end samples nothing
