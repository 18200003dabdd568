"""KV cache allocation and sizing.

Sizing happens after the weights are loaded and one warm-up forward has run, so the activation
peak is known: on GPU the cache gets what `gpu_memory_utilization` leaves after that peak; on CPU
it gets a fixed byte budget.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def bytes_per_block(self) -> int:
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem

    @classmethod
    def from_hf_config(cls, cfg, block_size: int, dtype: torch.dtype) -> KVCacheSpec:
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim, block_size, dtype)


def num_blocks_for_budget(spec: KVCacheSpec, device: torch.device, gpu_memory_utilization: float,
                          cpu_bytes: int) -> int:
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        used_by_us = torch.cuda.max_memory_allocated(device)  # weights + warm-up activation peak
        used_by_others = total - free - torch.cuda.memory_reserved(device)
        budget = int(total * gpu_memory_utilization) - used_by_us - max(used_by_others, 0)
    else:
        budget = cpu_bytes
    return max(budget // spec.bytes_per_block, 0)


def allocate_kv_cache(spec: KVCacheSpec, num_blocks: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One (k, v) pair per layer, each [num_blocks, block_size, num_kv_heads, head_dim]."""
    shape = (num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
    # Zeroed: attention reads whole blocks and masks the unwritten tail, and a masked NaN still
    # poisons the sum (NaN * 0 = NaN), so every slot must hold a finite value from the start.
    return [(torch.zeros(shape, dtype=spec.dtype, device=device), torch.zeros(shape, dtype=spec.dtype, device=device))
            for _ in range(spec.num_layers)]
