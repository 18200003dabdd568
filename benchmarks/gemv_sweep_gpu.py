# ruff: noqa: B023  (each lambda is timed by do_bench at once, inside its loop iteration)
"""Config sweep of our batch-1 GEMV (layers/triton_gemv.py) for the Qwen2.5-1.5B projections, each
with the prologue the model runs it with (norm + residual before qkv and gate_up, SiLU·mul before
down). Prints the best (BLOCK_N, BLOCK_K, warps, stages) per shape against the current default.

    python benchmarks/gemv_sweep_gpu.py [--json FILE]

do_bench median with the L2 flushed between calls; GB/s = weight bytes / time.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from open_autoglm.layers.triton_gemv import default_config, gemv  # noqa: E402

SHAPES = {  # name: (N, K, prologue, bias)
    "qwen qkv": (2048, 1536, "norm", True), "qwen o": (1536, 1536, "plain", False),
    "qwen gate_up": (17920, 1536, "norm", False), "qwen down": (1536, 8960, "silu", False),
}
GRID = list(itertools.product((4, 8, 16), (256, 512, 1024), (4, 8), (3, 5)))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    out = []
    for name, (n, k, prologue, has_bias) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        x = torch.randn(1, 2 * k if prologue == "silu" else k, device="cuda", dtype=torch.bfloat16)
        extra = {}
        if prologue == "norm":
            extra = dict(residual=torch.randn_like(x), norm_weight=torch.rand(k, device="cuda", dtype=torch.bfloat16),
                         eps=1e-6)
        bias = torch.randn(n, device="cuda", dtype=torch.bfloat16) if has_bias else None
        ref, _ = gemv(x, w, bias, prologue, **extra)

        def timed(**cfg) -> float:
            y, _ = gemv(x, w, bias, prologue, **extra, **cfg)
            assert ((y.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2
            return 1e3 * do_bench(lambda: gemv(x, w, bias, prologue, **extra, **cfg), warmup=10, rep=50,
                                  return_mode="median")

        default_us = timed()
        rows = []
        for bn, bk, nw, ns in GRID:
            if bk > 2 * k:
                continue
            try:
                rows.append((timed(block_n=bn, block_k=bk, num_warps=nw, num_stages=ns), (bn, bk, nw, ns)))
            except Exception as e:  # noqa: BLE001  (a config that does not fit shared memory)
                print(f"{name} {(bn, bk, nw, ns)}: {type(e).__name__}")
        rows.sort()
        gb = n * k * 2 / 1e9
        print(f"{name:<13} default {default_config(n, k)} {default_us:6.1f} us ({gb / default_us * 1e6:5.0f} GB/s) | best "
              + "; ".join(f"{c} {t:.1f} us ({gb / t * 1e6:.0f} GB/s)" for t, c in rows[:4]), flush=True)
        out.append({"shape": name, "n": n, "k": k, "default_us": default_us, "best": rows[:8]})
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
