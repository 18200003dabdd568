"""`autoglm bench latency`: batch-1 decode speed against the memory-bandwidth floor and peers.

Floor: a decode step must read every weight and the context's KV once, so
    floor tokens/s = measured copy bandwidth / (weight bytes + KV bytes of the context).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

from open_autoglm.bench.common import (
    add_model_args,
    apply_model_args,
    decode_bytes_per_step,
    format_stats,
    measure_ceilings,
    memory_report,
    write_report,
)
from open_autoglm.bench.offline import random_prompts
from open_autoglm.cli_args import add_engine_args, engine_config_from_args

PEERS = ("gptfast",)


def time_decode(llm, prompt: list[int], output_len: int) -> dict:
    from open_autoglm.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    stamps = []
    start = time.perf_counter()
    for _ in llm.stream(prompt, params):
        stamps.append(time.perf_counter())
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"ttft_s": stamps[0] - start, "decode_tok_s": len(gaps) / (stamps[-1] - stamps[0]),
            "tpot_median_s": statistics.median(gaps), "tpot_p99_s": sorted(gaps)[int(0.99 * (len(gaps) - 1))]}


def _our_variants(llm, prompt: list[int], output_len: int, max_model_len: int | None) -> list[dict]:
    """Ours as configured (one-token steps through the fused Triton GEMVs when the model has them),
    then, on such a model, the same with cuBLAS GEMVs (graphs captured again): both rows printed,
    the better one first, with the GPU/host split and a kernel breakdown of the first."""
    from open_autoglm.bench.diagnose import graph_step_ms, kernel_breakdown, print_breakdown

    engine = llm.engine
    model = engine.model
    variants = [("open-autoglm", None)]
    if getattr(model, "decode_gemv", False):
        variants = [("open-autoglm (Triton GEMV)", True), ("open-autoglm (cuBLAS GEMV)", False)]
    rows = []
    for name, gemv_on in variants:
        if gemv_on is not None and model.decode_gemv != gemv_on:
            model.set_decode_gemv(gemv_on)
            engine.runner.capture_cuda_graphs(min(engine.config.max_num_seqs, 512), engine.max_model_len)
        time_decode(llm, prompt, 16)  # warm-up
        row = {"system": name, **time_decode(llm, prompt, output_len), "graph_ms": graph_step_ms(engine)}
        row["kernels"] = kernel_breakdown(engine)
        print(f"\n{name}:")
        print_breakdown(row["kernels"], row["graph_ms"], 1e3 * row["tpot_median_s"])
        rows.append(row)
    return sorted(rows, key=lambda r: -r["decode_tok_s"])


def cmd_bench_latency(args: argparse.Namespace) -> int:
    import torch

    from open_autoglm.llm import LLM

    apply_model_args(args)
    ceilings = measure_ceilings()
    llm = LLM(config=engine_config_from_args(args))
    engine = llm.engine
    prompt = random_prompts(1, args.input_len, engine.hf_config.vocab_size, args.seed)[0]
    rows = _our_variants(llm, prompt, args.output_len, args.max_model_len)
    kv_per_token = engine.runner.kv_spec.bytes_per_block // engine.runner.kv_spec.block_size
    step_bytes = decode_bytes_per_step(engine.model, kv_per_token, args.input_len + args.output_len // 2)
    memory = memory_report(engine)
    floor = ceilings.get("bandwidth_bytes_s", 0) / step_bytes if ceilings else None
    model_path, dtype, random = str(engine.model_path), engine.dtype, args.load_format == "dummy"
    _report(args, rows, floor, step_bytes, ceilings, memory)  # ours now: a peer cut short keeps it
    del llm, engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if "gptfast" in (args.peer or []) and torch.cuda.is_available():
        from open_autoglm.bench.peers import gpt_fast_decode, load_hf_model

        try:  # a peer that fails must not take our figures with it
            model = load_hf_model(model_path, dtype, "cuda", random, "sdpa")
            rate, warm = gpt_fast_decode(model, prompt, args.output_len)
            rows.append({"system": "gpt-fast-style (static cache + compile)", "decode_tok_s": rate, "warmup_s": warm})
            del model
        except Exception as e:  # noqa: BLE001
            print(f"gpt-fast-style peer failed: {type(e).__name__}: {e}")
    _report(args, rows, floor, step_bytes, ceilings, memory)
    print("\n" + format_stats(memory))
    _print(rows, floor, step_bytes)
    return 0


def _report(args, rows: list[dict], floor: float | None, step_bytes: int, ceilings: dict, memory: dict) -> None:
    for row in rows:
        row["pct_of_floor"] = 100 * row["decode_tok_s"] / floor if floor else None
    write_report(args.json, {"benchmark": "latency", "rows": rows, "floor_tok_s": floor, "step_bytes": step_bytes,
                             "ceilings": ceilings, "memory": memory,
                             "args": {k: v for k, v in vars(args).items() if k != "func"}})


def _print(rows: list[dict], floor: float | None, step_bytes: int) -> None:
    print(f"\nbytes read per decode step: {step_bytes / 1e9:.2f} GB; floor: "
          + (f"{floor:.0f} tok/s" if floor else "n/a (no GPU)"))
    print(f"{'system':<42} {'tok/s':>9} {'% floor':>8} {'graph ms':>9} {'ours / it':>10}")
    ours = rows[0]["decode_tok_s"]
    for r in rows:
        pct = f"{r['pct_of_floor']:.0f}%" if r.get("pct_of_floor") else "-"
        graph = f"{r['graph_ms']:.3f}" if r.get("graph_ms") else "-"
        ratio = "-" if r is rows[0] else f"{ours / r['decode_tok_s']:.2f}x"
        print(f"{r['system']:<42} {r['decode_tok_s']:>9.1f} {pct:>8} {graph:>9} {ratio:>10}")


def add_bench_latency_parser(subparsers) -> None:
    p = subparsers.add_parser("latency", help="batch-1 decode tokens/s against the bandwidth floor and peers")
    p.add_argument("--input-len", type=int, default=128, help="prompt length in tokens")
    p.add_argument("--output-len", type=int, default=256, help="tokens to decode")
    p.add_argument("--peer", action="append", choices=PEERS, help="also run this peer (GPU only; repeatable)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompt")
    add_model_args(p)
    add_engine_args(p)
    p.set_defaults(func=cmd_bench_latency)
