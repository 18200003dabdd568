"""Attention backends behind one interface (base.py).

    name     device   backend
    "torch"  any      TorchAttentionBackend: gather + SDPA, the ground truth
    "triton" cuda     TritonAttentionBackend: our paged decode / prefill kernels
    "auto"   cuda     triton if it imports, else torch
    "auto"   other    torch

GPU code is imported lazily: this package imports on a CPU-only install without triton.
"""

from __future__ import annotations

import importlib.util

import torch

from open_autoglm.attention.base import AttentionMetadata, BaseAttentionBackend, write_kv_cache
from open_autoglm.attention.torch_ref import TorchAttentionBackend

__all__ = [
    "AttentionMetadata",
    "BaseAttentionBackend",
    "TorchAttentionBackend",
    "get_attention_backend",
    "write_kv_cache",
]

BACKEND_NAMES = ("auto", "torch", "triton")


def _triton_importable() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # a broken install (e.g. no driver libs) must not break "auto"
        return False
    return True


def get_attention_backend(name: str, device: torch.device | str) -> BaseAttentionBackend:
    """Build the attention backend `name` for `device` (see the table above)."""
    device = torch.device(device)
    if name == "auto":
        name = "triton" if device.type == "cuda" and _triton_importable() else "torch"
    if name == "torch":
        return TorchAttentionBackend()
    if name == "triton":
        if device.type != "cuda":
            raise ValueError(
                f"attention backend 'triton' needs a CUDA device, got {device}; use 'torch' or 'auto'")
        if not _triton_importable():
            raise ValueError("attention backend 'triton' needs the `triton` package; use 'torch' or 'auto'")
        from open_autoglm.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend(device)
    raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")
