"""Batch-1 GEMV configs timed the way the engine runs them: a CUDA graph of 28 layers of
Qwen2.5-1.5B projections (qkv with norm, o, gate_up with norm, down with SiLU·mul), each layer its
own weights (2.6 GB: nothing stays in L2), PDL launches as in the engine.

The lm_head runs once at the end. One projection's config is varied at a time, the others stay at `default_config`; the chain's
replay time then moves by that projection's own gain. Per-kernel timing with do_bench
(gemv_sweep_gpu.py) charges each call a launch and an idle GPU; inside the graph neither exists.

    python benchmarks/gemv_chain_gpu.py [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from open_autoglm.layers.triton_gemv import default_config, gemv  # noqa: E402

LAYERS, HIDDEN, INTER, QKV, VOCAB = 28, 1536, 8960, 2048, 151936
CANDIDATES = {  # projection: (BLOCK_N, BLOCK_K, num_warps) tried in place of its default
    "qkv": [(16, 2048, 4), (8, 2048, 8), (4, 2048, 4), (16, 2048, 8)],
    "o": [(16, 2048, 4), (8, 2048, 8), (4, 2048, 4), (4, 1024, 4)],
    "gate_up": [(16, 512, 4), (8, 512, 8), (8, 256, 4), (4, 256, 4), (16, 1024, 8), (8, 2048, 8), (2, 2048, 4)],
    "down": [(8, 2048, 8), (2, 2048, 8), (4, 4096, 8), (8, 1024, 8), (4, 2048, 16), (4, 1024, 8)],
    "lm_head": [(8, 512, 4), (4, 1024, 4), (8, 2048, 4), (16, 512, 4), (4, 2048, 8), (8, 2048, 8)],
}
SHAPES = {"qkv": (2048, 1536), "o": (1536, 1536), "gate_up": (17920, 1536), "down": (1536, 8960),
          "lm_head": (151936, 1536)}


def build():
    dev, dt = "cuda", torch.bfloat16
    layers = []
    for _ in range(LAYERS):
        layers.append(dict(
            qkv=torch.randn(QKV, HIDDEN, device=dev, dtype=dt) / HIDDEN**0.5,
            qkv_bias=torch.randn(QKV, device=dev, dtype=dt),
            o=torch.randn(HIDDEN, HIDDEN, device=dev, dtype=dt) / HIDDEN**0.5,
            gate_up=torch.randn(2 * INTER, HIDDEN, device=dev, dtype=dt) / HIDDEN**0.5,
            down=torch.randn(HIDDEN, INTER, device=dev, dtype=dt) / INTER**0.5,
            ln1=torch.rand(HIDDEN, device=dev, dtype=dt), ln2=torch.rand(HIDDEN, device=dev, dtype=dt)))
    lm_head = torch.randn(VOCAB, HIDDEN, device=dev, dtype=dt) / HIDDEN**0.5
    return layers, lm_head


def chain(model, x, cfg: dict):
    """The four projections of every layer, then the lm_head; attention is left out (o_proj reads
    q's slice) and so is the final norm."""
    layers, lm_head = model
    residual = None
    for w in layers:
        qkv, residual = gemv(x, w["qkv"], w["qkv_bias"], "norm", residual, w["ln1"], 1e-6, **cfg.get("qkv", {}))
        h, _ = gemv(qkv[:, :HIDDEN], w["o"], **cfg.get("o", {}))
        gate_up, residual = gemv(h, w["gate_up"], None, "norm", residual, w["ln2"], 1e-6, **cfg.get("gate_up", {}))
        x, _ = gemv(gate_up, w["down"], None, "silu", **cfg.get("down", {}))
    return gemv(x, lm_head, **cfg.get("lm_head", {}))[0]


def replay_ms(model, x, cfg: dict, reps: int = 30) -> tuple[float, torch.Tensor]:
    out = chain(model, x, cfg)  # compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain(model, x, cfg)
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps, out.clone()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    model = build()
    x = torch.randn(1, HIDDEN, device="cuda", dtype=torch.bfloat16)
    nbytes = sum(t.numel() * 2 for w in model[0] for t in w.values()) + model[1].numel() * 2
    base_ms, ref = replay_ms(model, x, {})
    print(f"chain of {LAYERS} layers + lm_head, {nbytes / 1e9:.2f} GB: default configs {base_ms * 1e3:.1f} us "
          f"({nbytes / base_ms / 1e9:.2f} TB/s)", flush=True)
    report = {"default_us": base_ms * 1e3, "bytes": nbytes, "rows": []}
    for name, candidates in CANDIDATES.items():
        n, k = SHAPES[name]
        for bn, bk, nw in candidates:
            cfg = {name: dict(block_n=bn, block_k=bk, num_warps=nw)}
            try:
                ms, out = replay_ms(model, x, cfg)
            except Exception as e:  # noqa: BLE001  (a config that does not fit)
                print(f"{name} {(bn, bk, nw)}: {type(e).__name__}: {e}"[:200], flush=True)
                continue
            err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
            delta = (ms - base_ms) * 1e3 / LAYERS
            print(f"{name:<8} default {default_config(n, k)} -> {(bn, bk, nw)}: chain {ms * 1e3:7.1f} us, "
                  f"{delta:+.2f} us per layer, rel err {err:.1e}", flush=True)
            report["rows"].append({"proj": name, "config": [bn, bk, nw], "chain_us": ms * 1e3,
                                   "delta_us_per_layer": delta, "rel_err": err})
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
