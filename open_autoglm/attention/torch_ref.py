"""Reference attention: gather each request's blocks, then scaled-dot-product attention.

Plain PyTorch, runs anywhere, and is the ground truth the fast kernels are tested against.
Decode-only steps gather every sequence at once into one padded batch (one SDPA call instead of
one per sequence: the CPU path's main cost); mixed steps go sequence by sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from open_autoglm.attention.base import AttentionMetadata, BaseAttentionBackend, write_kv_cache


class TorchAttentionBackend(BaseAttentionBackend):
    name = "torch"

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        write_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)
        if meta.is_decode_only:
            return _batched_decode(q, k_cache, v_cache, meta, scale)
        block_size = k_cache.shape[1]
        num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
        out = torch.empty_like(q)
        start = 0
        for i, (q_len, seq_len) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
            num_blocks = -(-seq_len // block_size)
            blocks = meta.block_tables[i, :num_blocks]
            keys = k_cache[blocks].flatten(0, 1)[:seq_len]    # [S, Hkv, D]
            values = v_cache[blocks].flatten(0, 1)[:seq_len]  # [S, Hkv, D]
            queries = q[start:start + q_len]                  # [Q, H, D]
            out[start:start + q_len] = _causal_attention(queries, keys, values, scale, num_heads // num_kv_heads)
            start += q_len
        return out


def _batched_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                    scale: float) -> torch.Tensor:
    """q [B, H, D], one token per sequence; keys beyond each sequence's length are masked."""
    block_size = k_cache.shape[1]
    num_blocks = -(-meta.max_seq_len // block_size)
    tables = meta.block_tables[:, :num_blocks]                      # [B, nb]
    keys = k_cache[tables].flatten(1, 2).transpose(1, 2)            # [B, Hkv, S, D]
    values = v_cache[tables].flatten(1, 2).transpose(1, 2)          # [B, Hkv, S, D]
    positions = torch.arange(keys.shape[2], device=q.device)
    mask = positions[None, :] < meta.seq_lens[:, None]              # [B, S]
    # enable_gqa: each KV head serves its group of query heads without materializing copies.
    out = F.scaled_dot_product_attention(q[:, :, None, :], keys, values, attn_mask=mask[:, None, None, :],
                                         scale=scale, enable_gqa=True)  # [B, H, 1, D]
    return out[:, :, 0, :]


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, group: int) -> torch.Tensor:
    """q: [Q, H, D] are the last Q positions of a context of S keys [S, Hkv, D]."""
    q_len, seq_len = q.shape[0], k.shape[0]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)  # [S, H, D]
        v = v.repeat_interleave(group, dim=1)
    # Query j sits at absolute position seq_len - q_len + j and sees keys 0..that position.
    q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)[:, None]
    mask = torch.arange(seq_len, device=q.device)[None, :] <= q_pos  # [Q, S]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale
    )  # [H, Q, D]
    return out.transpose(0, 1)
