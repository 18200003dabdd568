"""Request bodies of the OpenAI-compatible API (pydantic, strict: "5" is not an integer).

Unknown fields are ignored (clients send vendor extras). Ranges that SamplingParams already checks
(top_p, penalties, logprobs) are left to it so each rule lives in one place; its errors name the
field and become 400s. Only what SamplingParams cannot know is bounded here.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from open_autoglm.sampling_params import SamplingParams

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MIN_TEMPERATURE = 1e-5  # below this, logits / T overflow; treated as greedy (as vLLM does)

TokenIds = list[int]
Prompt = str | list[str] | TokenIds | list[TokenIds]


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    include_usage: bool = False


class SamplingFields(BaseModel):
    """Fields every generating endpoint shares."""

    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    temperature: float = Field(1.0, ge=0, le=100)
    top_p: float = 1.0
    top_k: int = Field(0, ge=-1, le=2**31 - 1)
    min_p: float = 0.0
    n: int = Field(1, ge=1, le=1024)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    return_token_ids: bool = False  # extension: choices carry token_ids (and prompt_token_ids)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling_params(self, max_tokens: int, logprobs: int | None, seed: int | None) -> SamplingParams:
        temperature = 0.0 if self.temperature < MIN_TEMPERATURE else self.temperature
        return SamplingParams(
            max_tokens=max_tokens, temperature=temperature, top_p=self.top_p, top_k=self.top_k,
            min_p=self.min_p, seed=seed, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, repetition_penalty=self.repetition_penalty,
            stop=self.stop or [], stop_token_ids=[t for t in self.stop_token_ids or [] if t <= INT64_MAX],
            ignore_eos=self.ignore_eos, logprobs=logprobs, skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
        )


class CompletionRequest(SamplingFields):
    prompt: Prompt
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class InferRequest(BaseModel):
    """The simple endpoint: `{"input": "text" | [messages]}` -> `{"output": "text"}`."""

    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)

    input: str | list[dict[str, Any]]
    max_tokens: int | None = Field(None, ge=1, le=INT64_MAX)  # default: 128, or what fits
    temperature: float = Field(0.7, ge=0, le=100)
    top_p: float = 1.0
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stop: str | list[str] | None = None

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        temperature = 0.0 if self.temperature < MIN_TEMPERATURE else self.temperature
        return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=self.top_p,
                              seed=self.seed, stop=self.stop or [])
