"""The attention interface every backend implements.

The runner flattens all scheduled tokens of a step into one batch of T tokens (no padding):

    request      |  r0 (prefill chunk)  | r1 (decode) | r2 (decode)
    tokens       |  t0 t1 t2 t3         | t4          | t5
    query_start  |  0                   | 4           | 5           | 6   <- query_start_loc [B+1]
    seq_lens     |  4 (+ cached prefix)  | 17          | 9               <- context incl. new tokens [B]

KV cache per layer: k_cache, v_cache of shape [num_blocks, block_size, num_kv_heads, head_dim].
Token i of a request lives in slot = block_table[i // block_size] * block_size + i % block_size.
New tokens' K/V are written to `slot_mapping` before attending; queries attend causally to
every earlier position of their own request (cached prefix included).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor      # [T] int64: cache slot of each new token
    query_start_loc: torch.Tensor   # [B+1] int32: cumulative query lengths
    seq_lens: torch.Tensor          # [B] int32: context length after this step (cached + new)
    block_tables: torch.Tensor      # [B, max_blocks] int32, padded with 0
    # Host copies so reference code never syncs; kernels use the tensors above.
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    max_query_len: int
    max_seq_len: int

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def is_decode_only(self) -> bool:
        """Every request adds exactly one token (the case CUDA graphs and decode kernels serve)."""
        return self.max_query_len == 1


class BaseAttentionBackend(ABC):
    """Writes new K/V into the paged cache, then computes attention for the new queries."""

    name: str = "base"

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,        # [T, H, D]
        k: torch.Tensor,        # [T, Hkv, D]
        v: torch.Tensor,        # [T, Hkv, D]
        k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
        v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:          # [T, H, D]
        ...


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Scatter new K/V rows into their slots (plain indexing; works on any device)."""
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    k_cache.view(num_blocks * block_size, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    v_cache.view(num_blocks * block_size, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v)
