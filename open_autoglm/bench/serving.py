"""`autoglm bench serve`: load an OpenAI-compatible server with streaming completions and measure it.

Works against any server that speaks /v1/completions with `stream: true` (ours, vLLM, SGLang, ...).
Workload, as in vLLM's benchmark_serving: N prompts of ~L words (or exactly L random token ids),
M output tokens each (`ignore_eos`, a vLLM extension most servers accept), sent either as a
Poisson process at R requests/s or by C concurrent clients (neither: all at once).

    per request:  TTFT = first non-empty text chunk - send time
                  ITL  = gaps between consecutive text chunks
                  TPOT = (e2e - TTFT) / (output tokens - 1)
                  e2e  = last byte - send time
Token counts come from the server's usage chunk (`stream_options.include_usage`) when it sends one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import httpx

WORDS = ("the of and to in is was that for on with as by at from his her which an be this are had not but what all "
         "were when we there can more if no out so said up about than them into time only some could new these two "
         "may first then do any like my now over such our man me even most made after also did many before must "
         "through back years where much your way well down should because each just those people how too little "
         "state good very make world still own see men work long get here between both life being under never day "
         "same another know while last might us great old year off come since against go came right used take three").split()


@dataclass
class RequestResult:
    ok: bool
    start: float = 0.0            # seconds since the benchmark began
    ttft: float | None = None
    e2e: float = 0.0
    itls: list[float] = field(default_factory=list)
    chunk_times: list[float] = field(default_factory=list)  # seconds since the benchmark began
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None
    fingerprint: str | None = None

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def make_prompts(num_prompts: int, input_len: int, kind: str, vocab_size: int, seed: int) -> list[str | list[int]]:
    rng = random.Random(seed)
    if kind == "ids":
        return [[rng.randrange(vocab_size) for _ in range(input_len)] for _ in range(num_prompts)]
    return [" ".join(rng.choice(WORDS) for _ in range(input_len)) for _ in range(num_prompts)]


async def send_request(client: httpx.AsyncClient, url: str, payload: dict, t0: float) -> RequestResult:
    result = RequestResult(ok=False, start=time.perf_counter() - t0)
    sent = time.perf_counter()
    last = None
    try:
        async with client.stream("POST", url, json=payload) as response:
            if response.status_code != 200:
                await response.aread()
                result.error = f"HTTP {response.status_code}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    result.ok = result.error is None
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = f"stream error: {chunk['error'].get('code') or chunk['error'].get('message')}"
                    continue
                now = time.perf_counter()
                result.fingerprint = chunk.get("system_fingerprint") or result.fingerprint
                if chunk.get("usage"):
                    result.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if any(c.get("text") for c in chunk.get("choices", [])):
                    if last is None:
                        result.ttft = now - sent
                    else:
                        result.itls.append(now - last)
                    last = now
                    result.chunk_times.append(now - t0)
            if not result.ok and result.error is None:
                result.error = "stream ended without [DONE]"
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        result.error = type(e).__name__
    result.e2e = time.perf_counter() - sent
    if not result.output_tokens:
        result.output_tokens = len(result.chunk_times)
    return result


async def run_benchmark(args: argparse.Namespace) -> dict:
    from tqdm import tqdm

    base = args.url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(args.timeout, connect=30.0)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=timeout, verify=not args.insecure) as client:
        model = args.model or await _first_model(client, base)
        prompts = make_prompts(args.num_prompts, args.input_len, args.prompt_kind, args.vocab_size, args.seed)
        rng = random.Random(args.seed + 1)
        gate = asyncio.Semaphore(args.concurrency) if args.concurrency else None
        bar = tqdm(total=len(prompts), desc="requests", unit="req", file=sys.stderr)
        t0 = time.perf_counter()

        async def one(prompt) -> RequestResult:
            payload = {"model": model, "prompt": prompt, "max_tokens": args.output_len, "temperature": args.temperature,
                       "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            if gate is None:
                result = await send_request(client, base + args.endpoint, payload, t0)
            else:
                async with gate:
                    result = await send_request(client, base + args.endpoint, payload, t0)
            bar.update(1)
            return result

        tasks = []
        for prompt in prompts:
            tasks.append(asyncio.create_task(one(prompt)))
            if args.request_rate and args.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
        bar.close()
    return build_report(args, model, results, duration)


async def _first_model(client: httpx.AsyncClient, base: str) -> str:
    response = await client.get(base + "/v1/models")
    response.raise_for_status()
    return response.json()["data"][0]["id"]


def summarize(values: list[float]) -> dict:
    """mean / median / p99 in milliseconds (None when there is nothing to summarize)."""
    if not values:
        return {"mean": None, "median": None, "p99": None}
    ordered = sorted(values)
    return {"mean": 1e3 * statistics.fmean(ordered), "median": 1e3 * statistics.median(ordered), "p99": 1e3 * percentile(ordered, 99)}


def percentile(ordered: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default, as vLLM reports it)."""
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def build_report(args: argparse.Namespace, model: str, results: list[RequestResult], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error or "unknown"] = errors.get(r.error or "unknown", 0) + 1
    input_tokens = sum(r.prompt_tokens for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    return {
        "config": {"url": args.url, "model": model, "endpoint": args.endpoint, "num_prompts": args.num_prompts,
                   "input_len": args.input_len, "output_len": args.output_len, "prompt_kind": args.prompt_kind,
                   "request_rate": args.request_rate, "concurrency": args.concurrency,
                   "temperature": args.temperature, "seed": args.seed},
        "system_fingerprint": next((r.fingerprint for r in ok if r.fingerprint), None),
        "duration_s": duration, "completed": len(ok), "failed": len(results) - len(ok), "errors": errors,
        "total_input_tokens": input_tokens, "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration, "input_token_throughput": input_tokens / duration,
        "output_token_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
        "ttft_ms": summarize([r.ttft for r in ok if r.ttft is not None]),
        "tpot_ms": summarize([t for r in ok if (t := r.tpot) is not None]),
        "itl_ms": summarize([g for r in ok for g in r.itls]),
        "e2e_ms": summarize([r.e2e for r in ok]),
        "requests": [asdict(r) for r in results],
    }


def print_report(report: dict) -> None:
    cfg = report["config"]
    print(f"\n=== serving benchmark: {cfg['model']} @ {cfg['url']} ({report['system_fingerprint']}) ===")
    print(f"requests: {report['completed']} ok, {report['failed']} failed {report['errors'] or ''} "
          f"in {report['duration_s']:.2f}s")
    print(f"throughput: {report['request_throughput']:.2f} req/s, output {report['output_token_throughput']:.1f} tok/s, "
          f"total {report['total_token_throughput']:.1f} tok/s")
    for key, name in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "E2E")):
        s = report[key]
        if s["mean"] is not None:
            print(f"{name:>5} ms: mean {s['mean']:9.2f}  median {s['median']:9.2f}  p99 {s['p99']:9.2f}")


def add_bench_serve_parser(bench_subparsers) -> argparse.ArgumentParser:
    p = bench_subparsers.add_parser("serve", help="load an OpenAI-compatible server; TTFT, TPOT, ITL, throughput")
    p.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="model name to send (default: the server's first /v1/models entry)")
    p.add_argument("--endpoint", default="/v1/completions", help="completions path (default: /v1/completions)")
    p.add_argument("--num-prompts", type=int, default=100, help="requests to send (default: 100)")
    p.add_argument("--input-len", type=int, default=128, help="prompt length: words, or token ids (default: 128)")
    p.add_argument("--output-len", type=int, default=128, help="tokens to generate per request (default: 128)")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--request-rate", type=float, default=None, help="Poisson arrivals at R requests/s")
    load.add_argument("--concurrency", type=int, default=None, help="C clients, each sending one request at a time")
    p.add_argument("--prompt-kind", choices=("text", "ids"), default="text",
                   help="text: random common words; ids: exactly input-len random token ids (default: text)")
    p.add_argument("--vocab-size", type=int, default=1000, help="token ids are drawn from [0, vocab-size) (ids only)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default: 0, greedy)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts and arrival times")
    p.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    p.add_argument("--insecure", action="store_true", help="do not verify the server's TLS certificate")
    p.add_argument("--out", default=None, help="write the JSON report here")
    p.add_argument("--plot", default=None, help="write a PNG of latency distributions and throughput here")
    p.set_defaults(func=cmd_bench_serve)
    return p


def cmd_bench_serve(args: argparse.Namespace) -> int:
    if args.num_prompts < 1 or args.input_len < 1 or args.output_len < 1:
        raise ValueError("--num-prompts, --input-len and --output-len must be >= 1")
    if (args.concurrency is not None and args.concurrency < 1) or (args.request_rate is not None and args.request_rate <= 0):
        raise ValueError("--concurrency and --request-rate must be positive")
    report = asyncio.run(run_benchmark(args))
    print_report(report)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"report: {args.out}")
    if args.plot:
        from open_autoglm.bench.plots import plot_serving

        plot_serving(report, args.plot)
        print(f"plot: {args.plot}")
    return 0 if report["completed"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m open_autoglm.bench.serving")
    add_bench_serve_parser(parser.add_subparsers(dest="bench_command", required=True))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
