"""Linear layers, including fused ("packed") ones that hold several checkpoint tensors.

A packed layer stores e.g. q_proj, k_proj and v_proj as row ranges of one weight so one matmul
computes all three. The model declares which checkpoint key goes to which shard
(`packed_modules_mapping`); the loader copies each checkpoint tensor into its row range.
"""

from __future__ import annotations

import torch
from torch import nn


class MergedLinear(nn.Linear):
    """One matmul over stacked output shards. shard id -> (row offset, row count)."""

    def __init__(self, in_features: int, shard_sizes: dict[str | int, int], bias: bool) -> None:
        super().__init__(in_features, sum(shard_sizes.values()), bias=bias)
        self.shards: dict[str | int, tuple[int, int]] = {}
        offset = 0
        for shard_id, size in shard_sizes.items():
            self.shards[shard_id] = (offset, size)
            offset += size

    def shard_view(self, param: torch.Tensor, shard_id: str | int) -> torch.Tensor:
        """The rows of `param` (weight or bias) that hold shard `shard_id`."""
        offset, size = self.shards[shard_id]
        return param.data.narrow(0, offset, size)
