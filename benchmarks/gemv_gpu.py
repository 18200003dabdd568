# ruff: noqa: B023  (each lambda is timed by do_bench at once, inside its loop iteration)
"""Batch-1 projections: cuBLAS (F.linear) vs our Triton GEMV (layers/triton_gemv.py), per shape.

    python benchmarks/gemv_gpu.py [--json FILE]

Shapes are every projection of Qwen2.5-1.5B and Llama-3.1-8B at one token. Time: do_bench
median (L2 flushed between calls, as in a real step where 3-15 GB of weights stream through);
GB/s = weight bytes / time. A few (BLOCK_N, BLOCK_K, warps) configs of ours; the best is printed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from open_autoglm.layers.triton_gemv import default_config, gemv  # noqa: E402

SHAPES = {  # name: (N, K)
    "qwen qkv": (2048, 1536), "qwen o": (1536, 1536), "qwen gate_up": (17920, 1536), "qwen down": (1536, 8960),
    "qwen lm_head": (151936, 1536), "llama qkv": (6144, 4096), "llama o": (4096, 4096),
    "llama gate_up": (28672, 4096), "llama down": (4096, 14336), "llama lm_head": (128256, 4096),
}
CONFIGS = [(8, 512, 4), (4, 512, 4), (4, 2048, 4), (8, 1024, 4), (16, 512, 8), (4, 1024, 4), (2, 1024, 4)]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    results = []
    print(f"{'shape':<14} {'N x K':>14} {'cuBLAS us':>10} {'GB/s':>6} {'ours us':>8} {'GB/s':>6} {'best cfg':>14} "
          f"{'default':>8}")
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        ref = F.linear(x, w)
        cublas = do_bench(lambda: F.linear(x, w), warmup=25, rep=100, return_mode="median")
        best = None
        for bn, bk, nw in CONFIGS:
            y, _ = gemv(x, w, block_n=bn, block_k=bk, num_warps=nw)
            err = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
            assert err < 1e-2, (name, bn, bk, nw, err)
            t = do_bench(lambda: gemv(x, w, block_n=bn, block_k=bk, num_warps=nw), warmup=25, rep=100,
                         return_mode="median")
            if best is None or t < best[0]:
                best = (t, (bn, bk, nw))
        default = do_bench(lambda: gemv(x, w), warmup=25, rep=100, return_mode="median")  # default_config(n, k)
        gb = n * k * 2 / 1e9
        row = {"shape": name, "n": n, "k": k, "cublas_us": 1e3 * cublas, "ours_us": 1e3 * best[0],
               "best_config": best[1], "cublas_gbs": gb / cublas * 1e3, "ours_gbs": gb / best[0] * 1e3,
               "default_us": 1e3 * default, "default_config": default_config(n, k)}
        results.append(row)
        print(f"{name:<14} {f'{n}x{k}':>14} {row['cublas_us']:>10.1f} {row['cublas_gbs']:>6.0f} "
              f"{row['ours_us']:>8.1f} {row['ours_gbs']:>6.0f} {str(best[1]):>14} {row['default_us']:>8.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
