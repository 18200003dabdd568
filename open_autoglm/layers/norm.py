"""RMSNorm (arXiv:1910.07467) with the same rounding as the Hugging Face implementations."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """`fused=True` (CUDA + triton) runs one Triton kernel per call (layers/triton_ops.py) with the
    same roundings; the plain PyTorch body is the reference (CPU, the "torch" attention backend)."""

    def __init__(self, hidden_size: int, eps: float, fused: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.fused = fused
        if fused:  # imported here, not per call: needs triton, which CPU installs may lack
            from open_autoglm.layers.triton_ops import add_rms_norm

            self._add_rms_norm = add_rms_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return self.forward_residual(x, None)[0]
        # Normalize in float32, round back to the activation dtype, then scale: this order matches
        # transformers bit for bit in bf16/fp16, which keeps greedy outputs token-identical.
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)

    def forward_residual(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-norm residual step: s = x + residual (just x when residual is None, the first layer);
        returns (norm(s), s). One kernel when fused instead of an add plus a norm."""
        if self.fused:
            return self._add_rms_norm(x, residual, self.weight, self.eps)
        s = x if residual is None else x + residual
        return self.forward(s), s
