"""argparse options generated from EngineConfig and SamplingParams, shared by every command."""

from __future__ import annotations

import argparse
import dataclasses
import typing

from open_autoglm.config import EngineConfig, load_config_file
from open_autoglm.sampling_params import SamplingParams

SAMPLING_HELP = {
    "max_tokens": "most tokens to generate",
    "temperature": "sampling temperature; 0 = greedy",
    "top_p": "nucleus sampling: keep the smallest set of tokens whose probability sums to top_p",
    "top_k": "keep only the k most likely tokens (0 = off)",
    "min_p": "drop tokens less likely than min_p x the most likely one",
    "seed": "random seed of this request (same seed, same output)",
    "presence_penalty": "OpenAI presence penalty in [-2, 2]",
    "frequency_penalty": "OpenAI frequency penalty in [-2, 2]",
    "repetition_penalty": "CTRL repetition penalty (> 1 discourages repeats)",
    "stop": "stop when this string appears (repeat the flag for several)",
    "ignore_eos": "keep generating past the end-of-sequence token",
}


# Engine fields whose flag would clash with a per-request sampling flag.
FLAG_NAMES = {"seed": "--default-seed"}


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine options")
    group.add_argument("--config", help="YAML config file (keys: model, backend, max_batch_size, dynamic_shape, "
                                        "enable_cache, or any engine option below); flags override it")
    for f in dataclasses.fields(EngineConfig):
        flag = FLAG_NAMES.get(f.name, "--" + f.name.replace("_", "-"))
        kwargs: dict = {"dest": f.name, "default": None, "help": f.metadata.get("help", "")}
        base = _base_type(f.type)
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = base
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
        if f.default is not None and f.default is not dataclasses.MISSING:
            kwargs["help"] += f" (default: {f.default})"
        group.add_argument(flag, **kwargs)


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)
               if getattr(args, f.name, None) is not None}
    if getattr(args, "config", None):
        return load_config_file(args.config, **options)
    return EngineConfig.from_options(**options)


def add_sampling_args(parser: argparse.ArgumentParser, max_tokens: int = 128, temperature: float = 0.7) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-tokens", type=int, default=max_tokens, help=SAMPLING_HELP["max_tokens"])
    group.add_argument("--temperature", type=float, default=temperature, help=SAMPLING_HELP["temperature"])
    for name in ("top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty", "repetition_penalty"):
        default = next(f.default for f in dataclasses.fields(SamplingParams) if f.name == name)
        group.add_argument("--" + name.replace("_", "-"), type=int if name in ("top_k", "seed") else float,
                           default=default, help=SAMPLING_HELP[name])
    group.add_argument("--stop", action="append", default=[], help=SAMPLING_HELP["stop"])
    group.add_argument("--ignore-eos", action="store_true", help=SAMPLING_HELP["ignore_eos"])


def sampling_params_from_args(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        min_p=args.min_p, seed=args.seed, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, repetition_penalty=args.repetition_penalty,
        stop=args.stop, ignore_eos=args.ignore_eos,
    )


def _base_type(annotation) -> type:
    """'int | None' -> int (dataclass annotations are strings under `from __future__ import annotations`)."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    for name, t in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if text.split("|")[0].strip() == name:
            return t
    return typing.cast(type, str)
