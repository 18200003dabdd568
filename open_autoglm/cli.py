"""`autoglm`: generate, chat, serve, pull, models, update, bench."""

from __future__ import annotations

import argparse
import logging
import sys

from open_autoglm.cli_args import (
    add_engine_args,
    add_sampling_args,
    engine_config_from_args,
    sampling_params_from_args,
)
from open_autoglm.errors import AutoGLMError


def cmd_generate(args: argparse.Namespace) -> int:
    from open_autoglm.llm import LLM

    llm = LLM(config=engine_config_from_args(args))
    params = sampling_params_from_args(args)
    if args.stream:
        for out in llm.stream(args.prompt, params):
            print(out.new_text, end="", flush=True)
        print()
    else:
        print(llm.generate([args.prompt], params)[0].text)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from open_autoglm.engine.chat import chat_prompt_ids
    from open_autoglm.llm import LLM

    llm = LLM(config=engine_config_from_args(args))
    params = sampling_params_from_args(args)
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    print(f"chatting with {llm.engine.model_path.name} ({llm.version}); /exit or Ctrl-D to quit, /reset to clear")
    while True:
        try:
            line = input(">>> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            history = history[:1] if args.system else []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        reply = ""
        for out in llm.stream(chat_prompt_ids(llm.tokenizer, history), params):
            print(out.new_text, end="", flush=True)
            reply += out.new_text
        print()
        history.append({"role": "assistant", "content": reply})


def cmd_pull(args: argparse.Namespace) -> int:
    from open_autoglm.models.catalog import pull

    print(pull(args.name, cache_dir=args.cache_dir))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from open_autoglm.models.catalog import CATALOG, list_cached

    cached = list_cached(args.cache_dir)
    print(f"{'NAME':<24} {'SIZE':>10}  PATH")
    for m in cached:
        print(f"{m.name:<24} {m.size_bytes / 2**20:>8.1f}MiB  {m.path}")
    missing = [name for name in CATALOG if name not in {m.name for m in cached}]
    if missing:
        print(f"\navailable to pull: {', '.join(missing)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autoglm", description="Open-AutoGLM: LLM inference, serving, live model updates")
    parser.add_argument("--log-level", default="WARNING", help="logging level (DEBUG, INFO, WARNING, ERROR)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("generate", help="generate a continuation of one prompt")
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    add_sampling_args(p)
    add_engine_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat through the model's chat template (keeps history)")
    p.add_argument("--system", default=None, help="system prompt")
    add_sampling_args(p, max_tokens=256)
    add_engine_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("pull", help="download and convert a catalog model into the model cache")
    p.add_argument("name", nargs="?", default="smollm2-135m", help="catalog name (default: smollm2-135m)")
    p.add_argument("--cache-dir", default=None, help="model cache folder (default: ~/.cache/open-autoglm)")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("models", help="list cached models; subcommands manage versioned models in the registry")
    p.add_argument("--cache-dir", default=None, help="model cache folder (default: ~/.cache/open-autoglm)")
    p.set_defaults(func=cmd_models)
    _add_optional(p, "open_autoglm.registry.cli", "add_registry_commands", nested=True)

    _add_optional(sub, "open_autoglm.server.cli", "add_serve_parser")
    _add_optional(sub, "open_autoglm.server.update_cli", "add_update_parser")

    bench = sub.add_parser("bench", help="benchmarks: throughput, latency, serve, update")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    _add_optional(bench_sub, "open_autoglm.bench.offline", "add_bench_throughput_parser")
    _add_optional(bench_sub, "open_autoglm.bench.latency", "add_bench_latency_parser")
    _add_optional(bench_sub, "open_autoglm.bench.serving", "add_bench_serve_parser")
    _add_optional(bench_sub, "open_autoglm.bench.update", "add_bench_update_parser")
    _add_optional(bench_sub, "open_autoglm.bench.prefix", "add_bench_prefix_parser")
    _add_optional(bench_sub, "open_autoglm.bench.startup", "add_bench_startup_parser")
    return parser


def _add_optional(target, module: str, function: str, nested: bool = False) -> None:
    """Commands whose module may be absent in a trimmed install register themselves if present."""
    import importlib

    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):
            return
        raise
    if nested:
        subs = target.add_subparsers(dest="models_command", metavar="SUBCOMMAND")
        getattr(mod, function)(subs)
    else:
        getattr(mod, function)(target)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args) or 0
    except (AutoGLMError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
