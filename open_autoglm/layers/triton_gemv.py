"""Single-token GEMV with the layer's elementwise prologue fused in (batch-1 decode).

At batch 1 a decode step is a chain of matrix-vector products separated by tiny elementwise
kernels; each tiny kernel costs ~2-3 µs of graph latency, about what the 1536x1536 o_proj itself
costs. So the elementwise op that feeds a projection runs inside it, as the projection's prologue:

    prologue  | x fed to the product                            | replaces
    "plain"   | x                                               | -
    "norm"    | rmsnorm(x + residual) * w_norm; writes x + res  | add_rms_norm (1 kernel)
    "silu"    | silu(gate) * up  (x = [gate | up])              | silu_and_mul (1 kernel)

y[n] = sum_k prologue(x)[k] * W[n, k] (+ bias[n]), W as nn.Linear stores it ([N, K], K contiguous).
Grid: one program per BLOCK_N output rows, each streaming its rows of W once (coalesced 16-byte
loads along K, software-pipelined); products accumulate elementwise in a [BLOCK_N, BLOCK_K] fp32
tile and are reduced once at the end. The norm prologue needs the row's mean square first: one
extra pass over x (a few KB, cached), repeated by every program, which is cheaper than a launch.
Roundings follow the torch path (every bf16 intermediate of the reference is rounded here too).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from open_autoglm.layers.pdl import pdl_enter, pdl_options


@triton.jit
def _rounded(x, dtype: tl.constexpr):
    return x.to(dtype).to(tl.float32)


@triton.jit
def _prologue_x(x_ptr, residual_ptr, norm_w_ptr, residual_out_ptr, cols, col_mask, inv_rms, write_residual,
                K: tl.constexpr, PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, dtype: tl.constexpr):
    """The slice `cols` of the vector fed to the product (see the table above), fp32."""
    if PROLOGUE == "silu":
        g = tl.load(x_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        u = tl.load(x_ptr + K + cols, mask=col_mask, other=0.0).to(tl.float32)
        xk = _rounded(_rounded(g / (1.0 + tl.exp(-g)), dtype) * u, dtype)
    else:
        xk = tl.load(x_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        if PROLOGUE == "norm":
            if HAS_RESIDUAL:
                xk = _rounded(xk + tl.load(residual_ptr + cols, mask=col_mask, other=0.0).to(tl.float32), dtype)
                tl.store(residual_out_ptr + cols, xk.to(dtype), mask=col_mask & write_residual)
            nw = tl.load(norm_w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
            xk = _rounded(nw * _rounded(xk * inv_rms, dtype), dtype)
    return xk


@triton.jit
def _gemv_kernel(
    x_ptr, residual_ptr, norm_w_ptr, residual_out_ptr, w_ptr, bias_ptr, y_ptr, eps,
    N, K: tl.constexpr, stride_w,
    PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr, USE_PDL: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    w_rows = w_ptr + rows[:, None].to(tl.int64) * stride_w
    dtype = y_ptr.dtype.element_ty
    # The first weight tile does not depend on the previous kernel: with PDL its load is in
    # flight while that kernel finishes (layers/pdl.py); x is read only after the wait.
    cols = tl.arange(0, BLOCK_K)
    w_first = tl.load(w_rows + cols[None, :], mask=row_mask[:, None] & (cols < K)[None, :], other=0.0)
    pdl_enter(USE_PDL)
    inv_rms = 0.0
    if PROLOGUE == "norm":  # pass 1: mean square of s = x + residual (rounded like the bf16 add)
        sq = tl.zeros([BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            c = k0 + tl.arange(0, BLOCK_K)
            s = tl.load(x_ptr + c, mask=c < K, other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                s = _rounded(s + tl.load(residual_ptr + c, mask=c < K, other=0.0).to(tl.float32), dtype)
            sq += s * s
        inv_rms = tl.math.rsqrt(tl.sum(sq, axis=0) / K + eps)
    write_residual = pid == 0  # program 0 writes the new residual stream ("norm" with a residual)
    xk = _prologue_x(x_ptr, residual_ptr, norm_w_ptr, residual_out_ptr, cols, cols < K, inv_rms, write_residual,
                     K, PROLOGUE, HAS_RESIDUAL, dtype)
    acc = w_first.to(tl.float32) * xk[None, :]
    for k0 in tl.range(BLOCK_K, K, BLOCK_K, num_stages=NUM_STAGES):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_mask = cols < K
        xk = _prologue_x(x_ptr, residual_ptr, norm_w_ptr, residual_out_ptr, cols, col_mask, inv_rms, write_residual,
                         K, PROLOGUE, HAS_RESIDUAL, dtype)
        w = tl.load(w_rows + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        acc += w.to(tl.float32) * xk[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, y.to(dtype), mask=row_mask)


def default_config(n: int, k: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps). Qwen2.5-1.5B shapes (K = 1536 rows, and down's 8960) from
    benchmarks/gemv_chain_gpu.py: all 28 layers' projections in one CUDA graph with PDL, one
    projection's config varied at a time (session 3, H100): whole-row tiles for the small ones,
    8-row programs for gate_up, 2048-wide steps with 8 warps for down. Llama-3.1-8B shapes
    (K = 4096, 14336) from benchmarks/gemv_gpu.py (run 3): 8 rows, 1024-wide steps, 512 for 14336.
    The 151936-row lm_head keeps 4 rows x 512."""
    if k <= 2048:
        if n <= 4096:
            return 8, 2048, 4
        return (8, 512, 4) if n <= 32768 else (4, 512, 4)
    if k <= 4096:
        return 8, 1024, 4
    if n <= 2048:
        return 4, 2048, 8
    return 8, (1024 if k <= 10240 else 512), 4


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, prologue: str = "plain",
         residual: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None, eps: float = 0.0,
         block_n: int | None = None, block_k: int | None = None,
         num_warps: int | None = None, num_stages: int = 3) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x [1, K'] (K' = 2K for "silu"); weight [N, K]. Returns (y [1, N], new residual or None).

    "norm": y = (rmsnorm(x + residual) * norm_weight) @ W.T, new residual = x + residual
    (residual None: the first layer, the new residual is x itself)."""
    assert x.shape[0] == 1 and x.is_contiguous() and weight.stride(1) == 1
    n, k = weight.shape
    assert x.shape[1] == (2 * k if prologue == "silu" else k), (x.shape, weight.shape, prologue)
    if block_n is None or block_k is None or num_warps is None:
        default_n, default_k, default_warps = default_config(n, k)
        block_n, block_k, num_warps = block_n or default_n, block_k or default_k, num_warps or default_warps
    y = torch.empty((1, n), dtype=x.dtype, device=x.device)
    residual_out = None
    if prologue == "norm":
        residual_out = torch.empty_like(x) if residual is not None else x
    block_k = min(block_k, triton.next_power_of_2(k))
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, residual if residual is not None else x, norm_weight if norm_weight is not None else x,
        residual_out if residual_out is not None else x, weight, bias if bias is not None else weight, y, eps,
        n, k, weight.stride(0),
        PROLOGUE=prologue, HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None,
        BLOCK_N=block_n, BLOCK_K=block_k, NUM_STAGES=num_stages, num_warps=num_warps, **pdl_options(x.device),
    )
    return y, residual_out
