"""Cold start: a fresh process to its first generated token, with the start-up split in parts.

    python -m open_autoglm.bench.startup --random-weights --arch-config qwen2.5-1.5b [--serve]

engine: a child process imports the engine, builds it (weights, warm-up + KV cache, CUDA-graph
        capture) and generates one token; it reports its own stage times, the parent measures
        wall time from spawning it to the token.
serve:  `python -m open_autoglm.cli serve` in a child; the parent polls /health until 200, then
        sends one completion (max_tokens=1): spawn -> that response is the server's cold start.
Triton compiles into its cache on first use: pass --triton-cache DIR (an empty folder = truly
cold; the same folder again = warm) to see the compile share.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request

from open_autoglm.bench.common import add_model_args, apply_model_args, format_stats, write_report
from open_autoglm.cli_args import add_engine_args, engine_config_from_args


def child(options: dict) -> None:
    """Runs in the child: build the engine, one token, print stage times as one JSON line."""
    t_start = time.time()
    import torch

    from open_autoglm.bench.common import memory_report
    from open_autoglm.llm import LLM
    from open_autoglm.sampling_params import SamplingParams

    t_imported = time.time()
    parts = _time_engine_parts()
    llm = LLM(**options)
    t_ready = time.time()
    llm.generate([[1000 + i for i in range(16)]], SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    t_token = time.time()
    stages = {"import_s": t_imported - t_start, "engine_s": t_ready - t_imported, "first_token_s": t_token - t_ready,
              **parts}
    print("STARTUP " + json.dumps({"stages": stages, "memory": memory_report(llm.engine), "t_token": t_token}), flush=True)


def _time_engine_parts() -> dict:
    """Wrap the engine's start-up calls with timers (the engine's own load_seconds lumps them):
    config + tokenizer (transformers is first imported there, by the tokenizer), the attention
    backend (first CUDA call: context creation), model allocation, random / checkpoint weights.
    Returns the dict the timers fill."""
    import open_autoglm.engine.llm_engine as engine_module
    import open_autoglm.models.catalog as catalog
    import open_autoglm.models.loader as loader

    parts: dict[str, float] = {}

    def timed(module, name: str, label: str) -> None:
        fn = getattr(module, name)

        def wrapper(*args, **kwargs):
            t0 = time.time()
            try:
                return fn(*args, **kwargs)
            finally:
                parts[label] = parts.get(label, 0.0) + time.time() - t0

        setattr(module, name, wrapper)

    timed(catalog, "resolve_model", "resolve_model_s")
    timed(engine_module, "open_source", "config_tokenizer_s")
    timed(loader, "_read_config", "config_s")  # inside open_source: config.json (AutoConfig only as fallback)
    timed(loader, "_load_tokenizer", "tokenizer_s")  # inside open_source: imports transformers' tokenizer classes
    timed(engine_module, "get_attention_backend", "attention_backend_cuda_init_s")
    timed(engine_module, "build_model", "build_model_s")
    timed(loader, "init_random", "random_weights_s")  # inside build_model
    return parts


def run_engine(options: dict, env: dict) -> dict:
    code = f"from open_autoglm.bench.startup import child; child({options!r})"
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    line = next((x for x in out.stdout.splitlines() if x.startswith("STARTUP ")), None)
    if line is None:
        raise RuntimeError(f"startup child failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    report = json.loads(line[len("STARTUP "):])
    report["wall_to_first_token_s"] = report.pop("t_token") - t0
    return report


def run_serve(model: str, engine_flags: list[str], env: dict, port: int, timeout: float = 300.0) -> dict:
    cmd = [sys.executable, "-m", "open_autoglm.cli", "serve", *(["--model", model] if model else []),
           "--port", str(port), "--served-model-name", "bench", "--no-access-log", *engine_flags]
    t0 = time.time()
    log_file = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a full pipe would stall the server
    proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        t_healthy = _wait_healthy(base, proc, t0 + timeout)
        # Token ids, not text: transformers rebuilds the stand-in tokenizer of a random-weights folder
        # from its model type (e.g. Qwen2Tokenizer), which does not map "t1000" back to id 1000.
        body = json.dumps({"model": "bench", "prompt": list(range(1000, 1016)), "max_tokens": 1,
                           "temperature": 0}).encode()
        req = urllib.request.Request(base + "/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            resp.read()
        t_token = time.time()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log_file.seek(0)
        log = log_file.read()
        log_file.close()
    return {"wall_to_healthy_s": t_healthy - t0, "wall_to_first_token_s": t_token - t0,
            "server_log_tail": log.splitlines()[-15:]}


def _wait_healthy(base: str, proc: subprocess.Popen, deadline: float) -> float:
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return time.time()
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError("server not healthy in time")


def cmd_bench_startup(args: argparse.Namespace) -> int:
    apply_model_args(args)
    env = dict(os.environ)
    if args.triton_cache:
        env["TRITON_CACHE_DIR"] = args.triton_cache
    options = dataclasses.asdict(engine_config_from_args(args))  # plain values: they travel as a repr
    report = {"engine": run_engine(options, env)}
    eng = report["engine"]
    print("\n" + format_stats(eng["memory"]))
    print(f"engine: {eng['wall_to_first_token_s']:.2f} s spawn -> first token = " + format_stats(eng["stages"]))
    if args.serve:
        flags = ["--load-format", options["load_format"]] + (["--max-model-len", str(args.max_model_len)]
                                                             if args.max_model_len else [])
        report["serve"] = run_serve(args.model, flags, env, args.port)
        srv = report["serve"]
        print(f"serve:  {srv['wall_to_first_token_s']:.2f} s spawn -> first token "
              f"(healthy after {srv['wall_to_healthy_s']:.2f} s)")
    write_report(args.json, {"benchmark": "startup", **report,
                             "args": {k: v for k, v in vars(args).items() if k != "func"}})
    return 0


def add_bench_startup_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("startup", help="cold start: a fresh process (and `serve`) to its first token")
    _add_args(p)
    return p


def _add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--serve", action="store_true", help="also time `autoglm serve` to its first completion")
    p.add_argument("--port", type=int, default=8931, help="port for --serve")
    p.add_argument("--triton-cache", default=None, help="TRITON_CACHE_DIR for the children (empty = cold)")
    add_model_args(p)
    add_engine_args(p)
    p.set_defaults(func=cmd_bench_startup)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m open_autoglm.bench.startup", description=__doc__.split("\n")[0])
    _add_args(parser)
    return cmd_bench_startup(parser.parse_args(argv))


if __name__ == "__main__":
    if len(sys.argv) == 1:
        sys.argv.append("--help")
    sys.exit(main())

