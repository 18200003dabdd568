"""Triton kernel: paged prefill attention over a variable-length batch.

Each request r contributes q_len new queries (query_start_loc) at the end of a context of
seq_len keys (its cached prefix plus the new tokens, already written to the cache). Query j of r
sits at position ctx_len + j (ctx_len = seq_len - q_len) and sees keys 0..ctx_len + j.
Rows with q_len = 1 (decodes mixed into a prefill step) are just short requests.

Tile rows = (query token, query head of one KV group), flattened so that K/V tiles are loaded
once for the whole GQA group (as vLLM's unified Triton attention does):

    row r  ->  token = q_block * BLOCK_Q + r // GROUP,  head = kv_head * GROUP + r % GROUP
    BLOCK_Q = BLOCK_M // GROUP    (rows >= BLOCK_Q * GROUP are idle)

Keys are visited in tiles of BLOCK_N positions: first the tiles every row of the block sees in
full (no mask), then the tiles on the causal diagonal (masked). FlashAttention-2 online softmax
(Dao, arXiv:2307.08691) in fp32, scores in the log2 domain.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from open_autoglm.layers.pdl import pdl_enter, pdl_options

_LOG2E = 1.4426950408889634


@triton.jit
def _attend_tiles(
    acc, m_i, l_i, q, k_cache_ptr, v_cache_ptr, block_table, head_offset, q_pos, dims, dim_mask,
    kv_start, kv_end, scale_log2, stride_cache_block, stride_cache_slot,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    for n0 in range(kv_start, kv_end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        if CAUSAL:
            col_mask = cols < kv_end
        else:
            col_mask = cols >= 0  # every column of an unmasked tile is in range
        block_ids = tl.load(block_table + cols // BLOCK_SIZE, mask=col_mask, other=0).to(tl.int64)
        kv_offsets = block_ids * stride_cache_block + (cols % BLOCK_SIZE) * stride_cache_slot + head_offset
        kv_mask = col_mask[:, None] & dim_mask[None, :]
        k = tl.load(k_cache_ptr + kv_offsets[:, None] + dims[None, :], mask=kv_mask, other=0.0)  # [N, D]
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2                  # [M, N]
        if CAUSAL:
            s = tl.where(col_mask[None, :] & (cols[None, :] <= q_pos[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + kv_offsets[:, None] + dims[None, :], mask=kv_mask, other=0.0)  # [N, D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    scale_log2,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cache_block, stride_cache_slot, stride_cache_head, stride_bt,
    GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_enter(USE_PDL)
    seq = tl.program_id(0)
    # Reversed: the last query blocks see the most keys (causal), so they start first and the
    # short ones fill the tail of the grid (longest-processing-time-first scheduling).
    q_block = tl.num_programs(1) - 1 - tl.program_id(1)
    kv_head = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if q_block * BLOCK_Q < q_len:  # the grid covers the longest request; shorter ones idle here
        seq_len = tl.load(seq_lens_ptr + seq)
        ctx_len = seq_len - q_len
        rows = tl.arange(0, BLOCK_M)
        tokens = q_block * BLOCK_Q + rows // GROUP
        heads = kv_head * GROUP + rows % GROUP
        row_mask = (rows < BLOCK_Q * GROUP) & (tokens < q_len)
        dims = tl.arange(0, DIM_PAD)
        dim_mask = dims < HEAD_DIM
        q_rows = (q_start + tokens).to(tl.int64)
        q = tl.load(q_ptr + q_rows[:, None] * stride_qt + heads[:, None] * stride_qh + dims[None, :],
                    mask=row_mask[:, None] & dim_mask[None, :], other=0.0)  # [M, D]
        q_pos = ctx_len + tokens

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, DIM_PAD], tl.float32)
        block_table = block_tables_ptr + seq.to(tl.int64) * stride_bt
        head_offset = kv_head * stride_cache_head
        first_pos = ctx_len + q_block * BLOCK_Q                      # smallest query position in the block
        last_pos = ctx_len + tl.minimum(q_len, (q_block + 1) * BLOCK_Q) - 1
        full_end = (first_pos // BLOCK_N) * BLOCK_N                 # keys < full_end: seen by every row
        acc, m_i, l_i = _attend_tiles(
            acc, m_i, l_i, q, k_cache_ptr, v_cache_ptr, block_table, head_offset, q_pos, dims, dim_mask,
            0, full_end, scale_log2, stride_cache_block, stride_cache_slot,
            BLOCK_SIZE, BLOCK_N, False, DOT_PRECISION)
        acc, m_i, l_i = _attend_tiles(
            acc, m_i, l_i, q, k_cache_ptr, v_cache_ptr, block_table, head_offset, q_pos, dims, dim_mask,
            full_end, last_pos + 1, scale_log2, stride_cache_block, stride_cache_slot,
            BLOCK_SIZE, BLOCK_N, True, DOT_PRECISION)

        o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        tl.store(out_ptr + q_rows[:, None] * stride_ot + heads[:, None] * stride_oh + dims[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & dim_mask[None, :])


def paged_prefill(
    q: torch.Tensor,                # [T, H, D]
    k_cache: torch.Tensor,          # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,          # [num_blocks, block_size, Hkv, D]
    block_tables: torch.Tensor,     # [B, max_blocks] int32
    seq_lens: torch.Tensor,         # [B] int32
    query_start_loc: torch.Tensor,  # [B+1] int32
    max_query_len: int,
    scale: float,
    out: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Causal attention of each request's new queries over its paged context; returns out [T, H, D]."""
    # fp32 (tests only) takes the exact-fp32 dot, which needs small tiles to fit registers/smem.
    default = (32, 32, 4, 1) if q.dtype == torch.float32 else (128, 64, 8, 3)
    block_m, block_n, num_warps, num_stages = (
        given if given is not None else fallback
        for given, fallback in zip((block_m, block_n, num_warps, num_stages), default))
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    assert num_heads % num_kv_heads == 0 and q.stride(2) == 1 and k_cache.is_contiguous()
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    num_seqs = seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return out
    block_m = max(block_m, triton.next_power_of_2(group))
    block_q = block_m // group
    grid = (num_seqs, triton.cdiv(max_query_len, block_q), num_kv_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, block_tables, seq_lens, query_start_loc,
        scale * _LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=group, BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=block_n,
        HEAD_DIM=head_dim, DIM_PAD=max(16, triton.next_power_of_2(head_dim)), BLOCK_SIZE=block_size,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages, **pdl_options(q.device),
    )
    return out
