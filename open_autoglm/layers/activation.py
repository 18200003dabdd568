"""Gated MLP activation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    """x = [gate | up] along the last dim -> silu(gate) * up. `fused`: one Triton kernel (CUDA)."""

    def __init__(self, fused: bool = False) -> None:
        super().__init__()
        self.fused = fused
        if fused:  # imported here, not per call: needs triton, which CPU installs may lack
            from open_autoglm.layers.triton_ops import silu_and_mul

            self._silu_and_mul = silu_and_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return self._silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
