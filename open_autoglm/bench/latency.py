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
    measure_ceilings,
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


def cmd_bench_latency(args: argparse.Namespace) -> int:
    import torch

    from open_autoglm.llm import LLM

    apply_model_args(args)
    ceilings = measure_ceilings()
    llm = LLM(config=engine_config_from_args(args))
    engine = llm.engine
    prompt = random_prompts(1, args.input_len, engine.hf_config.vocab_size, args.seed)[0]
    time_decode(llm, prompt, 16)  # warm-up
    ours = time_decode(llm, prompt, args.output_len)
    kv_per_token = engine.runner.kv_spec.bytes_per_block // engine.runner.kv_spec.block_size
    step_bytes = decode_bytes_per_step(engine.model, kv_per_token, args.input_len + args.output_len // 2)
    rows = [{"system": "open-autoglm", **ours}]
    floor = ceilings.get("bandwidth_bytes_s", 0) / step_bytes if ceilings else None
    model_path, dtype, random = str(engine.model_path), engine.dtype, args.load_format == "dummy"
    del llm, engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if "gptfast" in (args.peer or []) and torch.cuda.is_available():
        from open_autoglm.bench.peers import gpt_fast_decode, load_hf_model

        model = load_hf_model(model_path, dtype, "cuda", random, "sdpa")
        rate, warm = gpt_fast_decode(model, prompt, args.output_len)
        rows.append({"system": "gpt-fast-style (static cache + compile)", "decode_tok_s": rate, "warmup_s": warm})
        del model
    for row in rows:
        row["pct_of_floor"] = 100 * row["decode_tok_s"] / floor if floor else None
    _print(rows, floor, step_bytes)
    write_report(args.json, {"benchmark": "latency", "rows": rows, "floor_tok_s": floor, "step_bytes": step_bytes,
                             "ceilings": ceilings, "args": {k: v for k, v in vars(args).items() if k != "func"}})
    return 0


def _print(rows: list[dict], floor: float | None, step_bytes: int) -> None:
    print(f"\nbytes read per decode step: {step_bytes / 1e9:.2f} GB; floor: "
          + (f"{floor:.0f} tok/s" if floor else "n/a (no GPU)"))
    print(f"{'system':<42} {'tok/s':>9} {'% floor':>8} {'ours / it':>10}")
    ours = rows[0]["decode_tok_s"]
    for r in rows:
        pct = f"{r['pct_of_floor']:.0f}%" if r.get("pct_of_floor") else "-"
        ratio = "-" if r is rows[0] else f"{ours / r['decode_tok_s']:.2f}x"
        print(f"{r['system']:<42} {r['decode_tok_s']:>9.1f} {pct:>8} {ratio:>10}")


def add_bench_latency_parser(subparsers) -> None:
    p = subparsers.add_parser("latency", help="batch-1 decode tokens/s against the bandwidth floor and peers")
    p.add_argument("--input-len", type=int, default=128, help="prompt length in tokens")
    p.add_argument("--output-len", type=int, default=256, help="tokens to decode")
    p.add_argument("--peer", action="append", choices=PEERS, help="also run this peer (GPU only; repeatable)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompt")
    add_model_args(p)
    add_engine_args(p)
    p.set_defaults(func=cmd_bench_latency)
