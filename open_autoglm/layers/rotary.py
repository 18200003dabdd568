"""Rotary position embedding (RoFormer, arXiv:2104.09864) over packed tokens.

Two pairings of the rotated dims exist in checkpoints:
  half        (Llama, Qwen2): dim i pairs with dim i + rotary_dim/2 ("rotate_half")
  interleaved (GLM-4):        dim 2i pairs with dim 2i + 1
Only the first `rotary_dim` dims of each head rotate (partial rotary); the rest pass through.
"""

from __future__ import annotations

import torch
from torch import nn


def default_inv_freq(rotary_dim: int, base: float) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64, device="cpu").float() / rotary_dim))


def hf_inv_freq(hf_config, device: torch.device | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention scaling for any rope type transformers knows (llama3, yarn, ...).
    The default type is computed here: transformers' rope module is imported only for the others.
    `hf_config` is a transformers config or a models.model_config.ModelConfig (plain data)."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        rotary_dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
        return default_inv_freq(rotary_dim, params.get("rope_theta", 10000.0)), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if not hasattr(hf_config, "standardize_rope_params"):  # a ModelConfig: the rope functions call this method
        # The base class is enough (they read rope_parameters and the shape) and, unlike the
        # architecture's config class, does not import transformers' validators and torch.distributed.
        from transformers.configuration_utils import PreTrainedConfig

        hf_config = PreTrainedConfig(**hf_config.to_dict())
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, device or torch.device("cpu"))
    return inv_freq.float().cpu(), float(scaling)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, inv_freq: torch.Tensor, max_position: int,
                 interleaved: bool = False, attention_scaling: float = 1.0, fused: bool = False) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.fused = fused  # one in-place Triton kernel for q and k (CUDA); same roundings
        if fused:  # imported here, not per call: needs triton, which CPU installs may lack
            from open_autoglm.layers.triton_ops import rotary_inplace

            self._rotary_inplace = rotary_inplace
        self.rotary_dim = inv_freq.numel() * 2
        self.interleaved = interleaved
        # Tables computed on the CPU, then moved to the device being built on: on the meta device
        # (a shadow model for a live update) the same ops would first import torch's meta kernels
        # and sympy, seconds of GIL-holding work on the update thread while the engine serves.
        target = torch.empty(0).device  # the `with torch.device(...)` being built under, if any
        positions = torch.arange(max_position, dtype=torch.float32, device="cpu")
        freqs = positions[:, None] * inv_freq.to("cpu", torch.float32)[None, :]  # [P, rotary_dim/2]
        self.register_buffer("cos_cache", (freqs.cos() * attention_scaling).to(target), persistent=False)
        self.register_buffer("sin_cache", (freqs.sin() * attention_scaling).to(target), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T]; q [T, H, D]; k [T, Hkv, D]. The fused path rotates q and k in place."""
        if self.fused:
            self._rotary_inplace(positions, q, k, self.cos_cache, self.sin_cache, self.interleaved)
            return q, k
        cos = self.cos_cache[positions].unsqueeze(1)  # [T, 1, rotary_dim/2]
        sin = self.sin_cache[positions].unsqueeze(1)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def rotate_and_cache(self, positions, q, k, v, k_cache, v_cache, slot_mapping) -> None:
        """Fused path only: rotate q, k in place and write K, V into their cache slots (one kernel)."""
        self._rotary_inplace(positions, q, k, self.cos_cache, self.sin_cache, self.interleaved, v, k_cache,
                             v_cache, slot_mapping)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        cos, sin = cos.to(dtype), sin.to(dtype)
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim:]
        if self.interleaved:
            x1, x2 = rot[..., 0::2], rot[..., 1::2]
            out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        else:
            x1, x2 = rot.chunk(2, dim=-1)
            out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return torch.cat((out, rest), dim=-1) if rest.numel() else out
