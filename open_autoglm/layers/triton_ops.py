"""Fused Triton kernels for the non-attention elementwise parts of a decoder layer.

Why: at batch 1 a decode step is ~300 tiny launches; in plain PyTorch each RMSNorm is 8 kernels,
rotary ~20, SiLU·mul 2. Inside a CUDA graph every kernel still costs ~2 µs of dependent latency,
which on Qwen2.5-1.5B (floor ~1 ms/step) is more than the weights' read time. One kernel each:

    op                       | torch kernels | here | rounding kept identical to the torch path
    residual add + RMSNorm   |      9        |  1   | sum rounded to dtype, norm in fp32, round, * w
    rotary (q and k, in place)|    ~20        |  1   | cos/sin rounded to dtype, each product rounded
    SiLU(gate) * up          |      2        |  1   | silu rounded to dtype, then the product

"Rounding kept identical" means every intermediate that the torch path stores in bf16/fp16 is
rounded to that dtype here too (x.to(dtype).to(fp32)), so the fused path differs from the
reference only by fp32 reduction order and exp/rsqrt ulps. The torch path stays the reference
(CPU, and the "torch" attention backend). Imported lazily: needs triton and a CUDA device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from open_autoglm.layers.pdl import pdl_enter, pdl_options


@triton.jit
def _add_rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr,
    stride_x, stride_r, stride_o, stride_ro, eps,
    HIDDEN: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl_enter(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < HIDDEN
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # the residual stream lives in dtype
        tl.store(residual_out_ptr + row * stride_ro + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    var = tl.sum(x32 * x32, axis=0) / HIDDEN
    normed = (x32 * tl.math.rsqrt(var + eps)).to(x.dtype).to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """s = x + residual (or x); returns (rmsnorm(s) * weight, s). x, residual: [T, hidden]."""
    num_tokens, hidden = x.shape
    assert x.stride(1) == 1 and (residual is None or residual.stride(1) == 1)
    out = torch.empty_like(x)
    residual_out = torch.empty_like(x) if residual is not None else x
    if num_tokens == 0:
        return out, residual_out
    block = triton.next_power_of_2(hidden)
    r = residual if residual is not None else x
    _add_rms_norm_kernel[(num_tokens,)](
        x, r, weight, out, residual_out, x.stride(0), r.stride(0), out.stride(0), residual_out.stride(0), eps,
        HIDDEN=hidden, BLOCK=block, HAS_RESIDUAL=residual is not None,
        num_warps=max(1, min(16, block // 256)), **pdl_options(x.device),
    )
    return out, residual_out


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, INTER: tl.constexpr, BLOCK: tl.constexpr,
                         USE_PDL: tl.constexpr):
    pdl_enter(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < INTER
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + INTER + cols, mask=mask, other=0.0)
    g32 = gate.to(tl.float32)
    act = (g32 / (1.0 + tl.exp(-g32))).to(gate.dtype).to(tl.float32)  # F.silu rounds to dtype
    tl.store(out_ptr + row * stride_o + cols, (act * up.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x = [gate | up] along the last dim, [T, 2I] -> silu(gate) * up, [T, I]."""
    num_tokens, double = x.shape
    inter = double // 2
    out = torch.empty((num_tokens, inter), dtype=x.dtype, device=x.device)
    if num_tokens == 0:
        return out
    assert x.stride(1) == 1
    block = min(1024, triton.next_power_of_2(inter))
    _silu_and_mul_kernel[(num_tokens, triton.cdiv(inter, block))](
        x, out, x.stride(0), out.stride(0), INTER=inter, BLOCK=block, num_warps=4, **pdl_options(x.device))
    return out


@triton.jit
def _rotate_heads(x_ptr, row, stride_t, stride_h, c, s, idx1, idx2, num_heads,
                  HEADS_PAD: tl.constexpr, HALF_PAD: tl.constexpr, HALF: tl.constexpr):
    heads = tl.arange(0, HEADS_PAD)[:, None]
    mask = (heads < num_heads) & (tl.arange(0, HALF_PAD)[None, :] < HALF)
    base = x_ptr + row * stride_t + heads * stride_h
    x1 = tl.load(base + idx1[None, :], mask=mask, other=0.0)
    x2 = tl.load(base + idx2[None, :], mask=mask, other=0.0)
    dtype = x1.dtype
    a1, a2 = x1.to(tl.float32), x2.to(tl.float32)
    # Each product and sum is rounded to dtype, as the torch path's bf16 ops do.
    o1 = ((a1 * c).to(dtype).to(tl.float32) - (a2 * s).to(dtype).to(tl.float32)).to(dtype)
    o2 = ((a2 * c).to(dtype).to(tl.float32) + (a1 * s).to(dtype).to(tl.float32)).to(dtype)
    tl.store(base + idx1[None, :], o1, mask=mask)
    tl.store(base + idx2[None, :], o2, mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, positions_ptr, cos_ptr, sin_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cache, num_q_heads, num_kv_heads,
    v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr, stride_vt, stride_vh, stride_cache_slot, stride_cache_head,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, Q_HEADS_PAD: tl.constexpr, K_HEADS_PAD: tl.constexpr,
    INTERLEAVED: tl.constexpr, WRITE_KV: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_enter(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + row).to(tl.int64)
    i = tl.arange(0, HALF_PAD)
    imask = i < HALF
    if INTERLEAVED:  # GLM-4: dim 2i pairs with 2i + 1
        idx1, idx2 = 2 * i, 2 * i + 1
    else:            # Llama, Qwen2: dim i pairs with i + rotary_dim / 2
        idx1, idx2 = i, i + HALF
    c = tl.load(cos_ptr + pos * stride_cache + i, mask=imask, other=0.0)
    s = tl.load(sin_ptr + pos * stride_cache + i, mask=imask, other=0.0)
    dtype = q_ptr.dtype.element_ty
    c = c.to(dtype).to(tl.float32)[None, :]  # the torch path multiplies by cos/sin cast to dtype
    s = s.to(dtype).to(tl.float32)[None, :]
    _rotate_heads(q_ptr, row, stride_qt, stride_qh, c, s, idx1, idx2, num_q_heads, Q_HEADS_PAD, HALF_PAD, HALF)
    _rotate_heads(k_ptr, row, stride_kt, stride_kh, c, s, idx1, idx2, num_kv_heads, K_HEADS_PAD, HALF_PAD, HALF)
    if WRITE_KV:  # then the token's K (rotated, pass-through dims too) and V into its cache slot
        tl.debug_barrier()  # the rotated k was stored by other threads of this program
        slot = tl.load(slot_mapping_ptr + row).to(tl.int64)
        heads = tl.arange(0, K_HEADS_PAD)[:, None]
        dims = tl.arange(0, DIM_PAD)[None, :]
        mask = (heads < num_kv_heads) & (dims < HEAD_DIM) & (slot >= 0)  # slot -1: padding, no write
        cache = slot * stride_cache_slot + heads * stride_cache_head + dims
        tl.store(k_cache_ptr + cache, tl.load(k_ptr + row * stride_kt + heads * stride_kh + dims, mask=mask), mask=mask)
        tl.store(v_cache_ptr + cache, tl.load(v_ptr + row * stride_vt + heads * stride_vh + dims, mask=mask), mask=mask)


def rotary_inplace(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_cache: torch.Tensor,
                   sin_cache: torch.Tensor, interleaved: bool, v: torch.Tensor | None = None,
                   k_cache: torch.Tensor | None = None, v_cache: torch.Tensor | None = None,
                   slot_mapping: torch.Tensor | None = None) -> None:
    """Rotate the first 2 * cos_cache.shape[1] dims of every head of q [T, H, D] and k [T, Hkv, D]
    in place (they may be strided views of one qkv tensor); cos/sin caches: [P, rotary_dim / 2] fp32.
    With v and the caches: also write each token's K and V into its slot (-1 = skip), which saves
    the attention backend's separate KV-write launch (see TritonAttentionBackend.attend)."""
    num_tokens, num_heads, head_dim = q.shape
    if num_tokens == 0:
        return
    assert q.stride(2) == 1 and k.stride(2) == 1 and q.dtype == k.dtype
    write_kv = k_cache is not None
    if write_kv:
        assert v.stride(2) == 1 and k_cache.is_contiguous() and k_cache.dtype == k.dtype
    else:
        v, k_cache, v_cache, slot_mapping = k, k, k, positions  # unused placeholders
    half = cos_cache.shape[1]
    _rotary_kernel[(num_tokens,)](
        q, k, positions, cos_cache, sin_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_cache.stride(0), num_heads, k.shape[1],
        v, k_cache, v_cache, slot_mapping, v.stride(0), v.stride(1),
        k_cache.stride(1) if write_kv else 0, k_cache.stride(2) if write_kv else 0,
        HALF=half, HALF_PAD=triton.next_power_of_2(half), Q_HEADS_PAD=triton.next_power_of_2(num_heads),
        K_HEADS_PAD=triton.next_power_of_2(k.shape[1]), INTERLEAVED=interleaved, WRITE_KV=write_kv,
        HEAD_DIM=head_dim, DIM_PAD=triton.next_power_of_2(head_dim), num_warps=4, **pdl_options(q.device),
    )
