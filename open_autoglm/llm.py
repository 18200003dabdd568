"""The Python API: `LLM` for batches, chat and streaming; `AutoGLM` / `AutoGLMEngine` for one-liners."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from open_autoglm.config import EngineConfig, load_config_file, options_for_level
from open_autoglm.engine.chat import chat_prompt_ids
from open_autoglm.engine.llm_engine import LLMEngine
from open_autoglm.engine.request import RequestOutput
from open_autoglm.errors import RequestError
from open_autoglm.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    """Offline engine: `generate` a batch, `chat`, or `stream` one request.

    >>> llm = LLM()                      # the default model, pulled once
    >>> llm.generate(["The capital of France is"], SamplingParams(max_tokens=8, temperature=0))[0].text
    """

    def __init__(self, model: str | None = None, config: EngineConfig | None = None, **engine_options: Any) -> None:
        if config is None:
            config = EngineConfig.from_options(model=model, **engine_options)
        elif model is not None or engine_options:
            config = config.replace(**({"model": model} if model else {}), **engine_options)
        self.engine = LLMEngine(config)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def version(self) -> str:
        return self.engine.version

    def generate(self, prompts: Prompt | list[Prompt], sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Run every prompt to completion (continuous batching); outputs in prompt order."""
        prompts = _as_prompt_list(prompts)
        params = _params_per_prompt(sampling_params, len(prompts))
        ids = self._add_all(prompts, params)
        finished = self._run(ids, use_tqdm)
        return [finished[i] for i in ids]

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             use_tqdm: bool = False) -> list[RequestOutput]:
        """Each conversation goes through the model's chat template, then generates one reply."""
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = [chat_prompt_ids(self.tokenizer, conv) for conv in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield one RequestOutput per generated token (`new_text` is the delta)."""
        rid = self.engine.add_request(prompt, sampling_params or SamplingParams())
        done = False
        try:
            while not done:
                for out in self.engine.step():
                    if out.request_id == rid:
                        done = out.finished
                        yield out
        finally:
            if not done:
                self.engine.abort_request(rid)

    def _add_all(self, prompts: list[Prompt], params: list[SamplingParams]) -> list[str]:
        ids: list[str] = []
        try:
            for prompt, p in zip(prompts, params):  # final outputs only: no per-step objects or text
                ids.append(self.engine.add_request(prompt, p, final_only=True))
        except Exception:
            for rid in ids:  # all or nothing: a bad prompt adds none of the batch
                self.engine.abort_request(rid)
            raise
        return ids

    def _run(self, ids: list[str], use_tqdm: bool) -> dict[str, RequestOutput]:
        wanted = set(ids)
        finished: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(ids), desc="requests", unit="req")
        while len(finished) < len(wanted):
            for out in self.engine.step():
                if out.finished and out.request_id in wanted:
                    finished[out.request_id] = out
                    if bar:
                        bar.update(1)
        if bar:
            bar.close()
        return finished


def _as_prompt_list(prompts: Prompt | list[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, list) and prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]
    if not isinstance(prompts, list) or not prompts:
        raise RequestError("prompts", "give a string, a list of token ids, or a non-empty list of those")
    return prompts


def _params_per_prompt(params, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    if len(params) != n:
        raise RequestError("sampling_params", f"got {len(params)} for {n} prompts")
    return list(params)


class AutoGLM:
    """The simplest API: `AutoGLM(model_path=...).generate("prompt") -> str`."""

    def __init__(self, model_path: str | None = None, device: str = "auto", **engine_options: Any) -> None:
        self.llm = LLM(model=model_path, device=device, **engine_options)

    def generate(self, prompt: str, max_tokens: int = 128, temperature: float = 0.7, top_p: float = 1.0,
                 **sampling: Any) -> str:
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, **sampling)
        return self.llm.generate([prompt], params)[0].text


class AutoGLMEngine(AutoGLM):
    """`AutoGLMEngine(model_path=..., device=..., optimize_level=0..3)`; see docs/optimize_levels.md
    (and the table in config.py) for what each level switches on. `config` may name a YAML file."""

    def __init__(self, model_path: str | None = None, device: str = "auto", optimize_level: int = 2,
                 config: str | None = None, **engine_options: Any) -> None:
        options = options_for_level(optimize_level)
        options.update(engine_options)
        if config is not None:
            cfg = load_config_file(config, **({"model": model_path} if model_path else {}), device=device, **options)
            self.llm = LLM(config=cfg)
        else:
            self.llm = LLM(model=model_path, device=device, **options)
        self.optimize_level = optimize_level

    def generate(self, prompt: str, max_tokens: int = 128, temperature: float = 0.7, top_p: float = 1.0,
                 **sampling: Any) -> str:
        return super().generate(prompt=prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p, **sampling)
