"""Attention backends.

CPU: the torch reference backend against a naive dense causal attention computed in float64 from
each request's logical K/V (no paging), over GQA/MQA/MHA, block sizes, prefix-cached contexts and
mixed prefill + decode batches.

GPU (`gpu` marker): every Triton kernel against the reference backend on fresh random inputs
(bf16/fp16/fp32; block sizes; GQA ratios; head dims 64/128; contexts 1..8k; batches 1..256),
outputs poisoned with NaN first so an unwritten element fails.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from open_autoglm.attention import AttentionMetadata, TorchAttentionBackend, get_attention_backend

# bf16/fp16 rounding of inputs and outputs dominates; fp32 paths must be near exact.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 1e-2}


def make_batch(q_lens: list[int], seq_lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int,
               block_size: int, dtype: torch.dtype, device: str = "cpu", seed: int = 0, extra_blocks: int = 2):
    """Random paged batch. Prefix K/V (positions < seq_len - q_len) are already in the cache; the new
    tokens' K/V come as k, v with their slots in meta.slot_mapping. Blocks are shuffled, unused
    cache slots hold noise, block_tables carry `extra_blocks` padding columns of 0.

    Returns q, k, v, k_cache, v_cache, meta, keys, values (keys/values: each request's logical [S, Hkv, D]).
    """
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3
    max_blocks = max(blocks_per_seq, default=0) + extra_blocks
    perm = torch.randperm(num_blocks, generator=gen)
    block_tables = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache, v_cache = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    keys, values, slots, new_k, new_v = [], [], [], [], []
    used = 0
    for i, (q_len, seq_len) in enumerate(zip(q_lens, seq_lens)):
        block_tables[i, :blocks_per_seq[i]] = perm[used:used + blocks_per_seq[i]].int()
        used += blocks_per_seq[i]
        seq_k = torch.randn(seq_len, num_kv_heads, head_dim, generator=gen)
        seq_v = torch.randn(seq_len, num_kv_heads, head_dim, generator=gen)
        seq_slots = (block_tables[i, torch.arange(seq_len) // block_size].long() * block_size
                     + torch.arange(seq_len) % block_size)  # [S]
        ctx_len = seq_len - q_len
        k_cache.view(-1, num_kv_heads, head_dim)[seq_slots[:ctx_len]] = seq_k[:ctx_len]
        v_cache.view(-1, num_kv_heads, head_dim)[seq_slots[:ctx_len]] = seq_v[:ctx_len]
        keys.append(seq_k.to(dtype))
        values.append(seq_v.to(dtype))
        slots.append(seq_slots[ctx_len:])
        new_k.append(seq_k[ctx_len:])
        new_v.append(seq_v[ctx_len:])
    num_tokens = sum(q_lens)
    q = torch.randn(num_tokens, num_heads, head_dim, generator=gen)
    query_start_loc = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    query_start_loc[1:] = torch.tensor(q_lens, dtype=torch.int32).cumsum(0)
    meta = AttentionMetadata(
        slot_mapping=torch.cat(slots).to(device), query_start_loc=query_start_loc.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device), block_tables=block_tables.to(device),
        query_lens_cpu=list(q_lens), seq_lens_cpu=list(seq_lens),
        max_query_len=max(q_lens), max_seq_len=max(seq_lens),
    )

    def put(x: torch.Tensor) -> torch.Tensor:
        return x.to(dtype=dtype, device=device)

    return (put(q), put(torch.cat(new_k)), put(torch.cat(new_v)), put(k_cache), put(v_cache), meta,
            keys, values)


def naive_attention(q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor],
                    q_lens: list[int], scale: float) -> torch.Tensor:
    """Dense causal attention in float64, one request at a time, heads looped explicitly."""
    num_heads = q.shape[1]
    out = torch.empty(q.shape, dtype=torch.float64)
    start = 0
    for q_len, k, v in zip(q_lens, keys, values):
        seq_len, group = k.shape[0], num_heads // k.shape[1]
        for j in range(q_len):
            pos = seq_len - q_len + j
            for h in range(num_heads):
                qv = q[start + j, h].double()
                kh, vh = k[:pos + 1, h // group].double(), v[:pos + 1, h // group].double()  # [pos+1, D]
                w = torch.softmax(kh @ qv * scale, dim=0)
                out[start + j, h] = w @ vh
        start += q_len
    return out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


# (num_heads, num_kv_heads, head_dim, block_size)
CPU_LAYOUTS = [(4, 4, 32, 16), (8, 2, 64, 16), (12, 2, 128, 16), (6, 1, 64, 8), (8, 4, 16, 32)]
# (q_lens, seq_lens)
CPU_BATCHES = {
    "prefill": ([5, 33, 1], [5, 33, 1]),
    "prefix_cached": ([7, 16, 3], [40, 16, 19]),
    "decode": ([1, 1, 1, 1], [1, 9, 16, 70]),
    "mixed": ([1, 12, 1, 30, 2], [50, 12, 17, 64, 33]),
}


@pytest.mark.parametrize("layout", CPU_LAYOUTS, ids=lambda x: "h{}kv{}d{}bs{}".format(*x))
@pytest.mark.parametrize("batch", list(CPU_BATCHES), ids=str)
def test_reference_matches_naive_fp32(layout, batch):
    num_heads, num_kv_heads, head_dim, block_size = layout
    q_lens, seq_lens = CPU_BATCHES[batch]
    q, k, v, k_cache, v_cache, meta, keys, values = make_batch(
        q_lens, seq_lens, num_heads, num_kv_heads, head_dim, block_size, torch.float32, seed=hash(batch) % 1000)
    scale = head_dim ** -0.5
    out = TorchAttentionBackend().forward(q, k, v, k_cache, v_cache, meta, scale)
    assert out.shape == q.shape
    assert rel_err(out, naive_attention(q, keys, values, q_lens, scale)) < 1e-5
    # The new tokens' K/V landed in their slots.
    flat_k = k_cache.view(-1, num_kv_heads, head_dim)
    assert torch.equal(flat_k[meta.slot_mapping], k)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_reference_matches_naive_low_precision(dtype):
    q_lens, seq_lens = CPU_BATCHES["mixed"]
    q, k, v, k_cache, v_cache, meta, keys, values = make_batch(q_lens, seq_lens, 8, 2, 64, 16, dtype, seed=3)
    out = TorchAttentionBackend().forward(q, k, v, k_cache, v_cache, meta, 0.125)
    assert out.dtype == dtype
    assert rel_err(out, naive_attention(q, keys, values, q_lens, 0.125)) < TOLERANCE[dtype]


def test_reference_reads_the_block_table():
    """The comparison can fail: point one request at another's blocks and the error must be large."""
    q_lens, seq_lens = [4, 4], [40, 40]
    q, k, v, k_cache, v_cache, meta, keys, values = make_batch(q_lens, seq_lens, 4, 2, 32, 16, torch.float32)
    meta.block_tables[0, :2] = meta.block_tables[1, :2]
    out = TorchAttentionBackend().forward(q, k, v, k_cache, v_cache, meta, 0.2)
    assert rel_err(out[:4], naive_attention(q, keys, values, q_lens, 0.2)[:4]) > 0.1


def test_get_attention_backend_on_cpu():
    assert get_attention_backend("auto", torch.device("cpu")).name == "torch"
    assert get_attention_backend("torch", "cpu").name == "torch"
    with pytest.raises(ValueError, match="CUDA"):
        get_attention_backend("triton", torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown attention backend"):
        get_attention_backend("flash", torch.device("cpu"))


def test_attention_package_imports_without_triton():
    code = "import sys, open_autoglm.attention; assert 'triton' not in sys.modules, 'triton imported eagerly'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


def test_decode_num_splits():
    pytest.importorskip("triton")
    from open_autoglm.attention.triton_decode import decode_num_splits

    assert decode_num_splits(256, 8, 8192, 132) == 1             # the GPU is already full
    assert decode_num_splits(1, 8, 8192, 132) == 64              # flash-decoding: long context, one request
    assert decode_num_splits(1, 2, 100, 132) == 1                # too short to be worth a second pass
    assert decode_num_splits(32, 2, 4096, 132) == 8              # 512 programs: one wave of 132 * 4
    assert decode_num_splits(32, 8, 8192, 132) == 2              # never just over a wave (3 -> 768 programs)
    assert decode_num_splits(1, 1, 10**6, 132) == 64


# ---------------------------------------------------------------- GPU: Triton kernels vs reference

gpu = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _release_gpu_memory():
    """The 8k-token references take several GiB; under `pytest -n 4` the workers share one GPU, so
    each test hands its cached blocks back instead of keeping them for its worker."""
    yield
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
DEVICE = "cuda"  # a developer may point this at "cpu" under TRITON_INTERPRET=1 (fp32/fp16 only)
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
# (num_heads, num_kv_heads, head_dim): Qwen2.5-1.5B, Llama-3-8B, MHA d64, MQA d64, GQA 7 d128
QWEN, LLAMA, MHA64, MQA64, GQA7 = (12, 2, 128), (32, 8, 128), (8, 8, 64), (16, 1, 64), (28, 4, 128)
ALL_LAYOUTS = [QWEN, LLAMA, MHA64, MQA64, GQA7]


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _reference(q, k, v, k_cache, v_cache, meta, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference output in fp32 from fp32 copies; returns (out, k_cache after the write)."""
    kc, vc = k_cache.float().clone(), v_cache.float().clone()
    out = TorchAttentionBackend().forward(q.float(), k.float(), v.float(), kc, vc, meta, scale)
    return out, kc


def _per_seq_max_err(out, ref, q_lens) -> float:
    """Worst request's relative error (a global norm would hide one wrong short request)."""
    bounds = torch.tensor([0] + list(q_lens)).cumsum(0).tolist()
    return max(rel_err(out[a:b], ref[a:b]) for a, b in zip(bounds, bounds[1:]) if b > a)


def _lengths(batch: int, max_len: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, max_len + 1, (batch,), generator=gen).tolist()
    lens[0] = max_len  # always reach the longest context
    return lens


def _layout_id(layout) -> str:
    return "h{}kv{}d{}".format(*layout)


@gpu
@pytest.mark.parametrize("dtype", [BF16, FP16, FP32], ids=str)
def test_triton_write_kv_skips_padding(dtype):
    from open_autoglm.attention.triton_kv import write_kv_cache_triton

    num_blocks, block_size, num_kv_heads, head_dim, num_tokens = 50, 16, 4, 128, 300
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim).to(dtype=dtype, device=DEVICE)
    v_cache = torch.randn_like(k_cache)
    qkv = torch.randn(num_tokens, (8 + 2 * num_kv_heads) * head_dim).to(dtype=dtype, device=DEVICE)
    k = qkv[:, 8 * head_dim:(8 + num_kv_heads) * head_dim].view(num_tokens, num_kv_heads, head_dim)  # strided view
    v = qkv[:, (8 + num_kv_heads) * head_dim:].view(num_tokens, num_kv_heads, head_dim)
    slots = torch.randperm(num_blocks * block_size)[:num_tokens].to(DEVICE)
    slots[::7] = -1                                  # padding rows of a CUDA-graph batch
    expect_k, expect_v = k_cache.clone(), v_cache.clone()
    keep = slots >= 0
    expect_k.view(-1, num_kv_heads, head_dim)[slots[keep]] = k[keep]
    expect_v.view(-1, num_kv_heads, head_dim)[slots[keep]] = v[keep]
    write_kv_cache_triton(k, v, k_cache, v_cache, slots)
    _sync()
    assert torch.equal(k_cache, expect_k) and torch.equal(v_cache, expect_v)


# (batch, max context, block_size, num_splits: None = heuristic)
DECODE_CASES = [(1, 1, 16, None), (1, 8192, 16, None), (3, 4000, 32, 7), (64, 2048, 16, None),
                (256, 1024, 16, None), (7, 8192, 64, 1), (32, 700, 8, 3)]
DECODE_PARAMS = (
    [(BF16, layout, case) for layout in ALL_LAYOUTS for case in DECODE_CASES]
    + [(dtype, layout, case) for dtype in (FP16, FP32) for layout in (QWEN, MHA64)
       for case in (DECODE_CASES[1], DECODE_CASES[2], DECODE_CASES[4])]
)


@gpu
@pytest.mark.parametrize(
    "dtype,layout,case", DECODE_PARAMS,
    ids=[f"{d}-{_layout_id(x)}-b{c[0]}ctx{c[1]}bs{c[2]}sp{c[3]}".replace("torch.", "") for d, x, c in DECODE_PARAMS])
def test_triton_decode_matches_reference(dtype, layout, case):
    from open_autoglm.attention.triton_decode import decode_num_splits, paged_decode

    (num_heads, num_kv_heads, head_dim), (batch, max_len, block_size, num_splits) = layout, case
    seq_lens = _lengths(batch, max_len, seed=batch + max_len)
    q, k, v, k_cache, v_cache, meta, _, _ = make_batch(
        [1] * batch, seq_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, DEVICE, seed=max_len)
    scale = head_dim ** -0.5
    ref, _ = _reference(q, k, v, k_cache, v_cache, meta, scale)
    TorchAttentionBackend().forward(q, k, v, k_cache, v_cache, meta, scale)  # just the KV write
    if num_splits is None:
        num_splits = decode_num_splits(batch, num_kv_heads, max(seq_lens), 132)
    out = torch.full_like(q, float("nan"))
    paged_decode(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale, num_splits, out=out)
    _sync()
    err = _per_seq_max_err(out, ref, [1] * batch)
    print(f"ERR decode {dtype} {layout} {case} splits={num_splits}: {err:.2e}")
    assert not out.isnan().any() and err <= TOLERANCE[dtype]


# (q_lens, seq_lens, block_size)
PREFILL_CASES = [
    ([1], [1], 16),
    ([8192], [8192], 16),                                      # one long prompt
    ([512, 1, 37, 1, 200], [512, 3000, 1037, 17, 8000], 16),   # prefix-cached chunks mixed with decodes
    ([128] * 16, [128 * (i + 1) for i in range(16)], 32),
    ([1] * 100 + [300], [50 + 40 * i for i in range(100)] + [300], 8),
    ([33, 1000, 5], [33, 5000, 5], 64),
]
PREFILL_PARAMS = (
    [(BF16, layout, case) for layout in ALL_LAYOUTS for case in range(len(PREFILL_CASES))]
    + [(dtype, layout, case) for dtype in (FP16, FP32) for layout in (QWEN, MHA64) for case in (2, 4)]
)


@gpu
@pytest.mark.parametrize(
    "dtype,layout,case", PREFILL_PARAMS,
    ids=[f"{d}-{_layout_id(x)}-case{c}".replace("torch.", "") for d, x, c in PREFILL_PARAMS])
def test_triton_prefill_matches_reference(dtype, layout, case):
    from open_autoglm.attention.triton_prefill import paged_prefill

    num_heads, num_kv_heads, head_dim = layout
    q_lens, seq_lens, block_size = PREFILL_CASES[case]
    q, k, v, k_cache, v_cache, meta, _, _ = make_batch(
        q_lens, seq_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, DEVICE, seed=case)
    scale = head_dim ** -0.5
    ref, _ = _reference(q, k, v, k_cache, v_cache, meta, scale)
    TorchAttentionBackend().forward(q, k, v, k_cache, v_cache, meta, scale)  # just the KV write
    out = torch.full_like(q, float("nan"))
    paged_prefill(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                  meta.max_query_len, scale, out=out)
    _sync()
    err = _per_seq_max_err(out, ref, q_lens)
    print(f"ERR prefill {dtype} {layout} case{case}: {err:.2e}")
    assert not out.isnan().any() and err <= TOLERANCE[dtype]


@gpu
@pytest.mark.parametrize("dtype", [BF16, FP16], ids=str)
@pytest.mark.parametrize("batch", ["decode", "mixed"])
def test_triton_backend_forward_writes_and_attends(dtype, batch):
    from open_autoglm.attention.triton_backend import TritonAttentionBackend

    if batch == "decode":
        q_lens, seq_lens = [1] * 48, _lengths(48, 3000, 1)
    else:
        q_lens, seq_lens = [1, 300, 1, 64], [900, 300, 5, 1000]
    q, k, v, k_cache, v_cache, meta, _, _ = make_batch(q_lens, seq_lens, 12, 2, 128, 16, dtype, DEVICE, seed=9)
    ref, ref_k_cache = _reference(q, k, v, k_cache, v_cache, meta, 0.1)
    if DEVICE == "cuda":
        backend = get_attention_backend("auto", torch.device("cuda"))
        assert backend.name == "triton"
    else:
        backend = TritonAttentionBackend(DEVICE)
    out = backend.forward(q, k, v, k_cache, v_cache, meta, 0.1)
    _sync()
    assert torch.equal(k_cache.float(), ref_k_cache)
    assert _per_seq_max_err(out, ref, q_lens) <= TOLERANCE[dtype]


@gpu
def test_triton_decode_cuda_graph_replay():
    """Capture one padded decode step (last row: slot -1, seq_len 0); replay it with longer contexts."""
    batch, num_heads, num_kv_heads, head_dim, block_size = 8, 32, 8, 128, 16
    steps = [make_batch([1] * batch, [n + 700 * i for n in _lengths(batch, 900, 2)], num_heads, num_kv_heads,
                        head_dim, block_size, BF16, "cuda", seed=i) for i in range(3)]
    num_blocks = max(step[3].shape[0] for step in steps)
    max_blocks = max(step[5].block_tables.shape[1] for step in steps)
    k_cache = torch.empty(num_blocks, block_size, num_kv_heads, head_dim, dtype=BF16, device="cuda")
    v_cache = torch.empty_like(k_cache)
    q, k, v = (torch.empty_like(x) for x in steps[0][:3])
    first = steps[0][5]
    meta = AttentionMetadata(first.slot_mapping.clone(), first.query_start_loc.clone(), first.seq_lens.clone(),
                             torch.zeros(batch, max_blocks, dtype=torch.int32, device="cuda"),
                             first.query_lens_cpu, first.seq_lens_cpu, 1, first.max_seq_len)

    def load(step) -> None:  # copy one step's inputs into the static tensors the graph reads
        for dst, src in zip((q, k, v), step[:3]):
            dst.copy_(src)
        k_cache[: step[3].shape[0]].copy_(step[3])
        v_cache[: step[4].shape[0]].copy_(step[4])
        meta.block_tables.zero_()[:, : step[5].block_tables.shape[1]].copy_(step[5].block_tables)
        meta.seq_lens.copy_(step[5].seq_lens)
        meta.slot_mapping.copy_(step[5].slot_mapping)
        meta.seq_lens[-1], meta.slot_mapping[-1] = 0, -1      # padding row

    backend = get_attention_backend("triton", torch.device("cuda"))
    load(steps[0])
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up: compile outside the capture
        backend.forward(q, k, v, k_cache, v_cache, meta, 0.1)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = backend.forward(q, k, v, k_cache, v_cache, meta, 0.1)
    for step in steps[1:]:
        load(step)
        graph.replay()
        ref, _ = _reference(*step[:6], 0.1)
        torch.cuda.synchronize()
        assert _per_seq_max_err(static_out[:-1], ref[:-1], [1] * (batch - 1)) <= TOLERANCE[BF16]
        assert torch.equal(static_out[-1], torch.zeros_like(static_out[-1]))  # padding row: zeros, not NaN
