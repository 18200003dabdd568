"""Attention kernels on the GPU: correctness first, then time against the machine's ceilings.

    PYTHONUNBUFFERED=1 python benchmarks/attention_gpu.py --out $OUT

1. the `gpu`-marked tests of tests/test_attention.py (Triton kernels vs the torch reference);
2. the two ceilings measured here: device-to-device copy (GB/s, read + write) and a bf16 matmul;
3. paged decode (Qwen2.5-1.5B 12/2/128 and Llama-3-8B 32/8/128 head layouts; batch 1/32/256;
   context 512/4k/8k; block_size 16, shuffled blocks) replayed from a CUDA graph, each checked
   against an fp32 reference on a few sequences, achieved GB/s of KV read vs the copy ceiling,
   next to torch SDPA over the same K/V stored dense (the peer; it pays no paging);
4. paged prefill TFLOP/s (causal FLOPs only) vs the matmul ceiling, next to dense causal SDPA;
5. a few kernel configurations of each, so the defaults can be chosen from data.
Prints a short table last; full logs and JSON under --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from open_autoglm.attention.triton_decode import decode_num_splits, paged_decode  # noqa: E402
from open_autoglm.attention.triton_kv import write_kv_cache_triton  # noqa: E402
from open_autoglm.attention.triton_prefill import paged_prefill  # noqa: E402

LAYOUTS = {"qwen2.5-1.5b": (12, 2, 128), "llama3-8b": (32, 8, 128)}
BLOCK_SIZE = 16
DTYPE = torch.bfloat16
# The first entry of each list is the kernel's default configuration.
DECODE_VARIANTS = [dict(block_n=64, num_warps=4, num_stages=3), dict(block_n=64, num_warps=4, num_stages=2),
                   dict(block_n=32, num_warps=4, num_stages=3), dict(block_n=128, num_warps=8, num_stages=2)]
PREFILL_VARIANTS = [dict(block_m=128, block_n=64, num_warps=8, num_stages=3),
                    dict(block_m=128, block_n=64, num_warps=8, num_stages=2),
                    dict(block_m=64, block_n=64, num_warps=4, num_stages=3)]


def log(msg: str, fh) -> None:
    print(msg, flush=True)
    fh.write(msg + "\n")
    fh.flush()


def bench_ms(fn) -> float:
    # 100 ms warm-up: run 1 saw new configs timed right after compiling run slow (clocks ramping).
    return do_bench(fn, warmup=100, rep=100, return_mode="median")


def graph_of(fn):
    """Capture fn (already compiled) into a CUDA graph; returns replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def ceilings() -> tuple[float, float]:
    src = torch.empty(2 * 1024**3 // 2, dtype=DTYPE, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = bench_ms(partial(dst.copy_, src))
    copy_gbs = 2 * src.numel() * 2 / ms / 1e6
    a = torch.randn(8192, 8192, dtype=DTYPE, device="cuda")
    b = torch.randn(8192, 8192, dtype=DTYPE, device="cuda")
    ms = bench_ms(partial(torch.matmul, a, b))
    return copy_gbs, 2 * 8192**3 / ms / 1e9


def paged_cache(batch: int, ctx: int, num_kv_heads: int, head_dim: int):
    """Uniform contexts, shuffled blocks: (k_cache, v_cache, block_tables, seq_lens)."""
    blocks_per_seq = math.ceil(ctx / BLOCK_SIZE)
    num_blocks = batch * blocks_per_seq
    shape = (num_blocks, BLOCK_SIZE, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, dtype=DTYPE, device="cuda")
    v_cache = torch.randn(shape, dtype=DTYPE, device="cuda")
    block_tables = torch.randperm(num_blocks, device="cuda").view(batch, blocks_per_seq).int()
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    return k_cache, v_cache, block_tables, seq_lens


def dense_kv(cache: torch.Tensor, block_tables: torch.Tensor, ctx: int) -> torch.Tensor:
    kv = cache[block_tables.long()].flatten(1, 2)[:, :ctx]  # [B, S, Hkv, D]
    return kv.transpose(1, 2).contiguous()                  # [B, Hkv, S, D]


def ref_rows(q, k_cache, v_cache, block_tables, seq, q_len, ctx, scale) -> torch.Tensor:
    """fp32 reference for the last q_len queries of sequence `seq` (q: [q_len, H, D])."""
    keys = k_cache[block_tables[seq].long()].flatten(0, 1)[:ctx].float()  # [S, Hkv, D]
    values = v_cache[block_tables[seq].long()].flatten(0, 1)[:ctx].float()
    group = q.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
    q_pos = torch.arange(ctx - q_len, ctx, device="cuda")[:, None]
    mask = torch.arange(ctx, device="cuda")[None, :] <= q_pos
    out = F.scaled_dot_product_attention(q.float().transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1),
                                         attn_mask=mask, scale=scale)
    return out.transpose(0, 1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def decode_case(name: str, batch: int, ctx: int, copy_gbs: float, num_sms: int, fh) -> dict:
    num_heads, num_kv_heads, head_dim = LAYOUTS[name]
    k_cache, v_cache, block_tables, seq_lens = paged_cache(batch, ctx, num_kv_heads, head_dim)
    q = torch.randn(batch, num_heads, head_dim, dtype=DTYPE, device="cuda")
    scale = head_dim ** -0.5
    kv_bytes = 2 * batch * ctx * num_kv_heads * head_dim * 2 + 2 * q.numel() * 2
    auto = decode_num_splits(batch, num_kv_heads, ctx, num_sms)
    results, replays = {}, {}
    for vi, variant in enumerate(DECODE_VARIANTS):
        for splits in sorted({auto, 1, min(64, 2 * auto)} if vi == 0 else {auto}):  # sweep splits on the default
            out = torch.full_like(q, float("nan"))
            replay = graph_of(partial(paged_decode, q, k_cache, v_cache, block_tables, seq_lens, scale, splits,
                                      out=out, **variant))
            replay()
            torch.cuda.synchronize()
            err = max(rel_err(out[s:s + 1], ref_rows(q[s:s + 1], k_cache, v_cache, block_tables, s, 1, ctx, scale))
                      for s in {0, batch - 1})
            us = bench_ms(replay) * 1e3
            results[(vi, splits)], replays[(vi, splits)] = (us, err), replay
            log(f"decode {name} b={batch} ctx={ctx} cfg={variant} splits={splits}: {us:.1f} us "
                f"{kv_bytes / us / 1e3:.0f} GB/s err={err:.1e}", fh)
    again_us = bench_ms(replays[(0, auto)]) * 1e3  # the same graph timed twice: the noise floor
    peer_us = float("nan")
    try:  # the peer is informative, not required
        dense_k, dense_v = dense_kv(k_cache, block_tables, ctx), dense_kv(v_cache, block_tables, ctx)
        peer = graph_of(partial(F.scaled_dot_product_attention, q[:, :, None, :], dense_k, dense_v,  # q: [B, H, 1, D]
                                scale=scale, enable_gqa=True))
        peer_us = bench_ms(peer) * 1e3
    except Exception as exc:
        log(f"peer sdpa failed: {exc!r}", fh)
    us, err = results[(0, auto)]
    best_key = min(results, key=lambda key: results[key][0])
    return dict(layout=name, batch=batch, ctx=ctx, splits=auto, us=us, again_us=again_us, err=err,
                gbs=kv_bytes / us / 1e3,
                pct_floor=100 * kv_bytes / copy_gbs / 1e3 / us, peer_us=peer_us, best_us=results[best_key][0],
                best=dict(DECODE_VARIANTS[best_key[0]], splits=best_key[1]))


def bench_decode(copy_gbs: float, num_sms: int, fh) -> list[dict]:
    rows = []
    for name in LAYOUTS:
        for batch in (1, 32, 256):
            for ctx in (512, 4096, 8192):
                rows.append(decode_case(name, batch, ctx, copy_gbs, num_sms, fh))
                torch.cuda.empty_cache()
    return rows


PREFILL_SHAPES = {  # name: (q_lens, seq_lens)
    "1x512": ([512], [512]),
    "1x2k": ([2048], [2048]),
    "1x8k": ([8192], [8192]),
    "16x512": ([512] * 16, [512] * 16),
    "4x(1k new|3k cached)": ([1024] * 4, [4096] * 4),
}


def causal_flops(q_lens, seq_lens, num_heads, head_dim) -> float:
    keys_seen = sum(q_len * (seq_len - q_len) + q_len * (q_len + 1) / 2 for q_len, seq_len in zip(q_lens, seq_lens))
    return 4 * num_heads * head_dim * keys_seen


def prefill_case(name: str, shape: str, mm_tflops: float, fh) -> dict:
    num_heads, num_kv_heads, head_dim = LAYOUTS[name]
    q_lens, seq_lens = PREFILL_SHAPES[shape]
    batch, ctx = len(q_lens), seq_lens[0]
    k_cache, v_cache, block_tables, seq_lens_t = paged_cache(batch, ctx, num_kv_heads, head_dim)
    q = torch.randn(sum(q_lens), num_heads, head_dim, dtype=DTYPE, device="cuda")
    bounds = [0] + torch.tensor(q_lens).cumsum(0).tolist()
    query_start_loc = torch.tensor(bounds, dtype=torch.int32, device="cuda")
    scale = head_dim ** -0.5
    flops = causal_flops(q_lens, seq_lens, num_heads, head_dim)
    results = {}
    for vi, variant in enumerate(PREFILL_VARIANTS):
        out = torch.full_like(q, float("nan"))
        run = partial(paged_prefill, q, k_cache, v_cache, block_tables, seq_lens_t, query_start_loc, max(q_lens),
                      scale, out=out, **variant)
        run()
        torch.cuda.synchronize()
        a, b = bounds[-2], bounds[-1]  # check the last request
        err = rel_err(out[a:b], ref_rows(q[a:b], k_cache, v_cache, block_tables, batch - 1, q_lens[-1], ctx, scale))
        ms = bench_ms(run)
        results[vi] = (ms, err)
        log(f"prefill {name} {shape} cfg={variant}: {ms * 1e3:.1f} us {flops / ms / 1e9:.0f} TFLOP/s "
            f"err={err:.1e} nan={out.isnan().any().item()}", fh)
    peer_tflops = float("nan")
    if q_lens == seq_lens:  # no cached prefix: SDPA's top-left causal mask means the same thing
        try:
            dense_k, dense_v = dense_kv(k_cache, block_tables, ctx), dense_kv(v_cache, block_tables, ctx)
            dense_q = q.view(batch, ctx, num_heads, head_dim).transpose(1, 2)  # [B, H, S, D]
            ms = bench_ms(partial(F.scaled_dot_product_attention, dense_q, dense_k, dense_v,
                                  is_causal=True, scale=scale, enable_gqa=True))
            peer_tflops = flops / ms / 1e9
        except Exception as exc:
            log(f"peer sdpa failed: {exc!r}", fh)
    ms, err = results[0]
    best = min(results, key=lambda key: results[key][0])
    return dict(layout=name, shape=shape, us=ms * 1e3, err=err, tflops=flops / ms / 1e9,
                pct_peak=100 * flops / ms / 1e9 / mm_tflops, peer_tflops=peer_tflops,
                best_tflops=flops / results[best][0] / 1e9, best=PREFILL_VARIANTS[best])


def bench_prefill(mm_tflops: float, fh) -> list[dict]:
    rows = []
    for name in LAYOUTS:
        for shape in PREFILL_SHAPES:
            rows.append(prefill_case(name, shape, mm_tflops, fh))
            torch.cuda.empty_cache()
    return rows


def bench_write_kv(copy_gbs: float, fh) -> list[dict]:
    rows = []
    for num_tokens in (256, 8192):
        num_kv_heads, head_dim = 8, 128
        k = torch.randn(num_tokens, num_kv_heads, head_dim, dtype=DTYPE, device="cuda")
        v = torch.randn_like(k)
        k_cache = torch.zeros(4096, BLOCK_SIZE, num_kv_heads, head_dim, dtype=DTYPE, device="cuda")
        v_cache = torch.zeros_like(k_cache)
        slots = torch.randperm(4096 * BLOCK_SIZE, device="cuda")[:num_tokens]
        us = bench_ms(graph_of(partial(write_kv_cache_triton, k, v, k_cache, v_cache, slots))) * 1e3
        moved = 4 * k.numel() * 2
        rows.append(dict(tokens=num_tokens, us=us, gbs=moved / us / 1e3))
        log(f"write_kv T={num_tokens} Hkv=8 D=128: {us:.1f} us {moved / us / 1e3:.0f} GB/s", fh)
    return rows


def run_tests(out_dir: Path, fh) -> str:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/test_attention.py", "-rP", "-p", "no:cacheprovider",
           "-x", "--timeout=600"]
    try:
        import xdist  # noqa: F401
        cmd += ["-n", "8"]
    except ImportError:
        pass
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    (out_dir / "pytest.log").write_text(proc.stdout + proc.stderr)
    worst: dict[str, float] = {}
    for line in proc.stdout.splitlines():
        if line.startswith("ERR "):
            kernel, dtype = line.split()[1:3]
            worst[f"{kernel} {dtype}"] = max(worst.get(f"{kernel} {dtype}", 0.0), float(line.rsplit(" ", 1)[1]))
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:]
    log(f"pytest ({time.time() - t0:.0f} s): {summary}", fh)
    for key, err in sorted(worst.items()):
        log(f"  max rel err {key}: {err:.2e}", fh)
    if proc.returncode != 0:
        log(proc.stdout[-6000:], fh)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out"))
    parser.add_argument("--skip-tests", action="store_true")
    args = parser.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    fh = open(out_dir / "attention_bench.log", "w")
    props = torch.cuda.get_device_properties(0)
    env = dict(device=props.name, sms=props.multi_processor_count, torch=torch.__version__, triton=triton.__version__,
               cuda=torch.version.cuda, python=platform.python_version(), date=time.strftime("%Y-%m-%d %H:%M"))
    log(f"env: {env}", fh)
    tests = "skipped" if args.skip_tests else run_tests(out_dir, fh)
    copy_gbs, mm_tflops = ceilings()
    log(f"ceilings: copy {copy_gbs:.0f} GB/s (read+write), bf16 matmul {mm_tflops:.0f} TFLOP/s", fh)
    write_rows = bench_write_kv(copy_gbs, fh)
    decode_rows = bench_decode(copy_gbs, props.multi_processor_count, fh)
    prefill_rows = bench_prefill(mm_tflops, fh)
    (out_dir / "attention_results.json").write_text(json.dumps(dict(
        env=env, tests=tests, copy_gbs=copy_gbs, mm_tflops=mm_tflops, write_kv=write_rows,
        decode=decode_rows, prefill=prefill_rows), indent=1))

    log(f"\n== {env['device']} torch {env['torch']} triton {env['triton']}; tests: {tests}", fh)
    log(f"== ceilings: copy {copy_gbs:.0f} GB/s, bf16 matmul {mm_tflops:.0f} TFLOP/s", fh)
    log("decode (bf16, bs16, CUDA graph)  layout  batch  ctx  splits  us (again)  GB/s  %floor  err | best cfg us"
        " | sdpa-dense us", fh)
    for r in decode_rows:
        log(f"  {r['layout']:13s} {r['batch']:4d} {r['ctx']:5d} {r['splits']:3d} {r['us']:8.1f} ({r['again_us']:7.1f})"
            f" {r['gbs']:6.0f} "
            f"{r['pct_floor']:5.0f}% {r['err']:.0e} | {r['best_us']:8.1f} "
            f"bn{r['best']['block_n']}w{r['best']['num_warps']}s{r['best']['num_stages']}sp{r['best']['splits']} "
            f"| {r['peer_us']:8.1f}", fh)
    log("prefill (bf16, causal)  layout  shape  us  TFLOP/s  %matmul  err | best TFLOP/s cfg | sdpa-dense TFLOP/s", fh)
    for r in prefill_rows:
        b = r["best"]
        log(f"  {r['layout']:13s} {r['shape']:22s} {r['us']:9.1f} {r['tflops']:5.0f} {r['pct_peak']:4.0f}% "
            f"{r['err']:.0e} | {r['best_tflops']:5.0f} m{b['block_m']}n{b['block_n']}w{b['num_warps']}s{b['num_stages']}"
            f" | {r['peer_tflops']:5.0f}", fh)


if __name__ == "__main__":
    main()
