"""CUDA graphs for decode steps: one graph per batch-size bucket, sharing one memory pool.

A decode step of B sequences replays the graph of the smallest bucket >= B, with the inputs
copied into static buffers and the extra rows padded:

    row        | input_id | position | slot | seq_len | block_table
    real (< B) |  token   |   pos    | slot |  len    |  its blocks
    pad (>= B) |    0     |    0     |  -1  |   1     |  zeros       <- slot -1: KV write skipped

Parameters and KV caches live at fixed addresses, so graphs stay valid across weight updates.
"""

from __future__ import annotations

import logging
import time

import torch

from open_autoglm.attention.base import AttentionMetadata

logger = logging.getLogger(__name__)


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
        self.buckets = batch_buckets(max_batch)
        size = self.buckets[-1]
        self.input_ids = torch.zeros(size, dtype=torch.long, device=device)
        self.positions = torch.zeros(size, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((size,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.ones(size, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(size, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(size + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.capture_seconds = 0.0

    def _meta(self, batch: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:batch], query_start_loc=self.query_start_loc[:batch + 1],
            seq_lens=self.seq_lens[:batch], block_tables=self.block_tables[:batch],
            query_lens_cpu=[1] * batch, seq_lens_cpu=[self.max_seq_len] * batch,
            max_query_len=1, max_seq_len=self.max_seq_len,
        )

    def _forward(self, batch: int) -> torch.Tensor:
        hidden = self.model(self.input_ids[:batch], self.positions[:batch], self.kv_caches, self._meta(batch))
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> float:
        """Capture every bucket, largest first (later, smaller graphs reuse the pool's memory)."""
        start = time.perf_counter()
        pool = None
        for batch in reversed(self.buckets):
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

    def can_run(self, meta: AttentionMetadata) -> bool:
        return meta.is_decode_only and meta.num_seqs <= self.buckets[-1]

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Logits [B, V] of a decode step of B sequences."""
        batch = meta.num_seqs
        bucket = next(b for b in self.buckets if b >= batch)
        self.input_ids[:batch].copy_(input_ids, non_blocking=True)
        self.positions[:batch].copy_(positions, non_blocking=True)
        self.slot_mapping[:batch].copy_(meta.slot_mapping, non_blocking=True)
        self.seq_lens[:batch].copy_(meta.seq_lens, non_blocking=True)
        width = meta.block_tables.shape[1]
        self.block_tables[:batch, :width].copy_(meta.block_tables, non_blocking=True)
        if bucket > batch:  # padding rows: write nowhere, read one slot of block 0
            self.slot_mapping[batch:bucket].fill_(-1)
            self.seq_lens[batch:bucket].fill_(1)
            self.block_tables[batch:bucket].zero_()
        self.graphs[bucket].replay()
        return self.outputs[bucket][:batch]
