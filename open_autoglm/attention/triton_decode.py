"""Triton kernels: paged decode attention (one query token per sequence), split-KV.

Flash-decoding (Dao et al., 2023, "Flash-Decoding for long-context inference"): when
num_seqs * num_kv_heads programs cannot fill the GPU, each sequence's context is cut into
`num_splits` contiguous ranges, one program per (sequence, KV head, split). Each program runs an
online softmax (Milakov & Gimelshein, arXiv:1805.02867) over its range and writes a partial
output and its log-sum-exp; a second kernel combines the splits:

    out = sum_s exp2(lse_s - m) * o_s / sum_s exp2(lse_s - m),   m = max_s lse_s

GQA: the GROUP = H / Hkv query heads that share a KV head are the rows of one tile, so every
K/V byte is read once per step. Scores are kept in the log2 domain (scale * log2(e) folded in).

CUDA graphs: the grid is (num_seqs, Hkv, num_splits), all host ints; each program reads its
sequence length on the device and derives its own range, so any num_splits is correct and a
graph captured with one split count stays right for every later length. A sequence of length 0
(padding) yields zeros, never NaN.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from open_autoglm.layers.pdl import pdl_enter, pdl_options

_LOG2E = 1.4426950408889634


# num_splits varies with the batch size: not specialized (==1 / %16 variants would each JIT-compile,
# ~1 s apiece at start-up when the CUDA graphs of every batch bucket are captured).
@triton.jit(do_not_specialize=["num_splits"])
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr,
    out_ptr, part_out_ptr, part_lse_ptr,
    scale_log2, num_splits,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cache_block, stride_cache_slot, stride_cache_head, stride_bt,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl_enter(USE_PDL)
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    # This split's key range [start, end), in whole tiles so splits never share a tile.
    tiles_per_split = tl.cdiv(tl.cdiv(seq_len, BLOCK_N), num_splits)
    start = split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, seq_len)

    rows = tl.arange(0, GROUP_PAD)              # query heads of this KV group (padded to >= 16 for tl.dot)
    dims = tl.arange(0, DIM_PAD)
    heads = kv_head * GROUP + rows
    row_mask = rows < GROUP
    dim_mask = dims < HEAD_DIM
    q = tl.load(q_ptr + seq * stride_qt + heads[:, None] * stride_qh + dims[None, :],
                mask=row_mask[:, None] & dim_mask[None, :], other=0.0)  # [G, D]

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], tl.float32)
    block_table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    head_offset = kv_head * stride_cache_head
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_mask = cols < end
        block_ids = tl.load(block_table + cols // BLOCK_SIZE, mask=col_mask, other=0).to(tl.int64)
        kv_offsets = block_ids * stride_cache_block + (cols % BLOCK_SIZE) * stride_cache_slot + head_offset
        kv_mask = col_mask[:, None] & dim_mask[None, :]
        k = tl.load(k_cache_ptr + kv_offsets[:, None] + dims[None, :], mask=kv_mask, other=0.0)  # [N, D]
        v = tl.load(v_cache_ptr + kv_offsets[:, None] + dims[None, :], mask=kv_mask, other=0.0)  # [N, D]
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2                  # [G, N]
        s = tl.where(col_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # An empty range (split past the end, or a padded sequence) leaves l_i = 0: emit 0 and lse = -inf.
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    o = acc / l_safe[:, None]
    if SPLIT:
        lse = tl.where(l_i > 0.0, m_i + tl.log2(l_safe), float("-inf"))
        part_row = (seq * NUM_HEADS + heads) * num_splits + split          # part_lse: [B, H, S]
        tl.store(part_lse_ptr + part_row, lse, mask=row_mask)
        tl.store(part_out_ptr + part_row[:, None] * HEAD_DIM + dims[None, :], o,  # part_out: [B, H, S, D]
                 mask=row_mask[:, None] & dim_mask[None, :])
    else:
        tl.store(out_ptr + seq * stride_ot + heads[:, None] * stride_oh + dims[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & dim_mask[None, :])


@triton.jit(do_not_specialize=["num_splits"])
def _decode_reduce_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, num_splits, stride_ot, stride_oh,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_enter(USE_PDL)
    seq = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS_PAD)
    dims = tl.arange(0, DIM_PAD)
    split_mask = splits < num_splits
    part_row = (seq * NUM_HEADS + head) * num_splits + splits
    lse = tl.load(part_lse_ptr + part_row, mask=split_mask, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    weights = tl.exp2(lse - m)                                          # 0 for empty splits
    parts = tl.load(part_out_ptr + part_row[:, None] * HEAD_DIM + dims[None, :],
                    mask=split_mask[:, None] & (dims < HEAD_DIM)[None, :], other=0.0)  # [S, D]
    total = tl.sum(weights, 0)
    o = tl.sum(parts * weights[:, None], 0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + seq * stride_ot + head * stride_oh + dims, o.to(out_ptr.dtype.element_ty),
             mask=dims < HEAD_DIM)


def decode_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int,
                      min_split_len: int = 128, max_splits: int = 64, ctas_per_sm: int = 4) -> int:
    """Splits per sequence: as many as fit in one wave of resident programs.

    Measured on an H200 (benchmarks/NOTES-attention.md): a grid just over one wave is the worst
    case (Llama-8B, 32 x 8k: 3 splits = 1.16 waves ran slower than 1 split), so the grid is
    sized to fill, not exceed, num_sms * ctas_per_sm (4 CTAs of the default 64-token, 3-stage
    config fit an SM's shared memory). Each split keeps >= min_split_len keys (2 tiles).
    Pure host arithmetic on static values (the runner's batch size and a length bound), so a
    CUDA graph captures a fixed grid. More splits never change the result, only the cost.
    """
    programs = max(num_seqs * num_kv_heads, 1)
    fit = num_sms * ctas_per_sm // programs
    by_len = triton.cdiv(max(max_seq_len, 1), min_split_len)
    return max(1, min(fit, by_len, max_splits))


def paged_decode(
    q: torch.Tensor,             # [B, H, D], one query token per sequence
    k_cache: torch.Tensor,       # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,       # [num_blocks, block_size, Hkv, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,      # [B] int32, context incl. the new token
    scale: float,
    num_splits: int,
    out: torch.Tensor | None = None,  # [B, H, D]
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 3,
) -> torch.Tensor:
    """Attention of one new query per sequence over its paged context; returns out [B, H, D]."""
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    assert num_heads % num_kv_heads == 0 and q.stride(2) == 1 and k_cache.is_contiguous()
    assert seq_lens.shape[0] >= num_seqs and block_tables.shape[0] >= num_seqs
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_seqs == 0:
        return out
    dim_pad = max(16, triton.next_power_of_2(head_dim))
    split = num_splits > 1
    part_out = part_lse = out  # unused placeholders when not splitting
    if split:
        part_out = torch.empty((num_seqs, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((num_seqs, num_heads, num_splits), dtype=torch.float32, device=q.device)
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, part_out, part_lse,
        scale * _LOG2E, num_splits,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        NUM_HEADS=num_heads, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim, DIM_PAD=dim_pad, BLOCK_SIZE=block_size, BLOCK_N=block_n,
        SPLIT=split, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages, **pdl_options(q.device),
    )
    if split:
        _decode_reduce_kernel[(num_seqs, num_heads)](
            part_out, part_lse, out, num_splits, out.stride(0), out.stride(1),
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, DIM_PAD=dim_pad,
            SPLITS_PAD=max(2, triton.next_power_of_2(num_splits)), num_warps=4, **pdl_options(q.device),
        )
    return out
