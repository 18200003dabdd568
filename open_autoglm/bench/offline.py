"""`autoglm bench throughput`: offline generation throughput, with peers run on the same workload.

Workload: N random-token prompts of L tokens, exactly M output tokens each (EOS ignored), as in
vLLM's benchmark_throughput. Peers run in the same invocation so the ratio is like for like.
"""

from __future__ import annotations

import argparse
import gc
import random
import time
from dataclasses import asdict, dataclass

from open_autoglm.bench.common import (
    add_model_args,
    apply_model_args,
    format_stats,
    memory_report,
    write_report,
)
from open_autoglm.cli_args import add_engine_args, engine_config_from_args

PEERS = ("hf",)


@dataclass
class ThroughputResult:
    system: str
    num_prompts: int
    input_len: int
    output_len: int
    seconds: float
    output_tokens: int

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.seconds

    @property
    def total_tok_s(self) -> float:
        return self.num_prompts * (self.input_len + self.output_len) / self.seconds


def random_prompts(num_prompts: int, input_len: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    # Stay clear of the low ids, where special tokens usually live.
    return [[rng.randrange(min(1000, vocab_size // 2), vocab_size) for _ in range(input_len)] for _ in range(num_prompts)]


def run_ours(llm, prompts: list[list[int]], output_len: int) -> ThroughputResult:
    from open_autoglm.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    # Warm-up on other prompts: reusing the measured ones would hand them prefix-cache hits.
    warm = random_prompts(2, len(prompts[0]), llm.engine.hf_config.vocab_size, seed=-1)
    llm.generate(warm, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=True)
    seconds = time.perf_counter() - start
    produced = sum(len(o.output_token_ids) for o in outputs)
    return ThroughputResult("open-autoglm", len(prompts), len(prompts[0]), output_len, seconds, produced)


def run_hf_generate_batch(model_path: str, prompts: list[list[int]], output_len: int, device: str, dtype,
                          random_weights: bool) -> ThroughputResult:
    """transformers' continuous batching (`generate_batch`, paged|sdpa attention)."""
    from open_autoglm.bench.peers import hf_generate_batch, load_hf_model

    model = load_hf_model(model_path, dtype, device, random_weights, "paged|sdpa")
    seconds, produced = hf_generate_batch(model, prompts, output_len)
    return ThroughputResult("transformers generate_batch", len(prompts), len(prompts[0]), output_len, seconds, produced)


def cmd_bench_throughput(args: argparse.Namespace) -> int:
    import torch

    from open_autoglm.llm import LLM

    apply_model_args(args)
    llm = LLM(config=engine_config_from_args(args))
    engine = llm.engine
    prompts = random_prompts(args.num_prompts, args.input_len, engine.hf_config.vocab_size, args.seed)
    results = [run_ours(llm, prompts, args.output_len)]
    memory = memory_report(engine)
    write_report(args.json, _report(results, args) | {"memory": memory})  # ours now: a peer cut short keeps it
    if "hf" in (args.peer or []):
        model_path, dtype = str(engine.model_path), engine.dtype
        del llm, engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        device = args.peer_device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:  # a peer that fails must not take our figures with it
            results.append(run_hf_generate_batch(model_path, prompts, args.output_len, device, dtype,
                                                 args.load_format == "dummy"))
        except Exception as e:  # noqa: BLE001
            print(f"transformers generate_batch peer failed: {type(e).__name__}: {e}")
    _print_table(results, memory)
    write_report(args.json, _report(results, args) | {"memory": memory})
    if args.plot:
        _plot(results, args.plot)
    return 0


def _plot(results: list[ThroughputResult], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    ax.barh([r.system for r in results], [r.output_tok_s for r in results], color=["tab:blue"] + ["tab:gray"] * 5)
    ax.set_xlabel("output tokens/s")
    ax.set_title(f"{results[0].num_prompts} x ({results[0].input_len} in -> {results[0].output_len} out)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _report(results: list[ThroughputResult], args) -> dict:
    return {
        "benchmark": "throughput",
        "results": [asdict(r) | {"output_tok_s": r.output_tok_s, "total_tok_s": r.total_tok_s} for r in results],
        "ratios": {r.system: results[0].output_tok_s / r.output_tok_s for r in results[1:]},
        "args": {k: v for k, v in vars(args).items() if k != "func"},
    }


def _print_table(results: list[ThroughputResult], memory: dict) -> None:
    print("\n" + format_stats(memory))
    ours = results[0]
    print(f"\n{'system':<30} {'seconds':>9} {'out tok/s':>11} {'total tok/s':>12} {'ours / peer':>12}")
    for r in results:
        ratio = f"{ours.output_tok_s / r.output_tok_s:.2f}x" if r is not ours else "-"
        print(f"{r.system:<30} {r.seconds:>9.2f} {r.output_tok_s:>11.1f} {r.total_tok_s:>12.1f} {ratio:>12}")


def add_bench_throughput_parser(subparsers) -> None:
    p = subparsers.add_parser("throughput", help="offline throughput on random prompts, optionally against peers")
    p.add_argument("--num-prompts", type=int, default=64, help="number of requests")
    p.add_argument("--input-len", type=int, default=128, help="prompt length in tokens")
    p.add_argument("--output-len", type=int, default=128, help="output length in tokens (EOS ignored)")
    p.add_argument("--peer", action="append", choices=PEERS, help="also run this peer on the same workload (repeatable)")
    p.add_argument("--peer-device", default=None, help="device for peers (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    add_model_args(p)
    add_engine_args(p)
    p.set_defaults(func=cmd_bench_throughput)
