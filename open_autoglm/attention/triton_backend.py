"""CUDA attention backend built from our own Triton kernels.

    forward:  write new K/V into their slots (triton_kv)
              -> decode kernel, split-KV   if every request adds one token (triton_decode)
              -> prefill kernel            otherwise; q_len = 1 rows ride along (triton_prefill)

Importing this module needs neither CUDA nor triton; the kernel modules are imported when a
backend is built, so `open_autoglm.attention` stays importable on a CPU-only install.
Nothing in forward syncs with the host: launch grids come from host ints (token count, number
of sequences, meta.max_query_len / meta.max_seq_len), which is what CUDA-graph capture needs.
"""

from __future__ import annotations

import torch

from open_autoglm.attention.base import AttentionMetadata, BaseAttentionBackend


class TritonAttentionBackend(BaseAttentionBackend):
    """Paged attention with Triton kernels (bf16 / fp16 / fp32).

    Decode-only steps: grid (num_seqs, Hkv, num_splits). num_splits is chosen from the batch size
    and meta.max_seq_len so that small batches over long contexts still fill the GPU; a graph
    captured with some max_seq_len stays correct for any later length (only speed depends on it).
    """

    name = "triton"

    def __init__(self, device: torch.device | str | None = None) -> None:
        from open_autoglm.attention import triton_decode, triton_kv, triton_prefill

        self._kv = triton_kv
        self._decode = triton_decode
        self._prefill = triton_prefill
        device = torch.device(device) if device is not None else torch.device("cuda")
        if device.type == "cuda":
            self.num_sms = torch.cuda.get_device_properties(device).multi_processor_count
        else:  # TRITON_INTERPRET=1 on CPU (tests only)
            self.num_sms = 4

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        self._kv.write_kv_cache_triton(k, v, k_cache, v_cache, meta.slot_mapping)
        return self.attend(q, k_cache, v_cache, meta, scale)

    def attend(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """forward() for callers that already wrote the new K/V (the fused rotary kernel does)."""
        if meta.is_decode_only:
            # One token per request: token i belongs to request i (query_start_loc = arange).
            num_splits = self._decode.decode_num_splits(
                meta.num_seqs, k_cache.shape[2], meta.max_seq_len, self.num_sms)
            return self._decode.paged_decode(
                q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale, num_splits)
        return self._prefill.paged_prefill(
            q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
            meta.max_query_len, scale)
