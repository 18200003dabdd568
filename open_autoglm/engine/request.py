"""A request's state as the scheduler sees it, and what the engine hands back each step."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from open_autoglm.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # blocks taken back; waits to be recomputed
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def finished(self) -> bool:
        return self in _FINISHED  # a tuple: identity comparisons, no Enum.__hash__ / .value (Python-level)


_FINISHED = (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED,
             RequestStatus.FINISHED_ERROR)


@dataclass(eq=False)
class Request:
    """One sequence. `num_computed_tokens` of `all_token_ids` have their KV in the cache.

    prompt + output = all tokens; the scheduler's only rule is to bring num_computed_tokens up
    to num_tokens (prefill, chunked prefill, decode and recompute after preemption alike).

    eq=False: requests compare (and hash) by identity. The generated __eq__ compared every field,
    prompt lists included, on each `request in running` / `running.remove(request)`.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    prompt: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[dict] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0       # prompt tokens served from the prefix cache (first schedule)
    block_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: str | int | None = None
    error: str | None = None
    version: str = ""               # weights version the request runs under
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    final_only: bool = False        # the caller reads only the final output: no per-step outputs
    # Per-token stop checks, precomputed (see __post_init__); the engine caps max_num_tokens at max_model_len.
    stop_ids: frozenset[int] = field(init=False)  # EOS (unless ignore_eos) and stop_token_ids
    max_num_tokens: int = field(init=False)       # prompt + max_tokens: num_tokens at which it ends

    def __post_init__(self) -> None:
        params = self.sampling_params
        eos = () if params.ignore_eos else self.eos_token_ids
        self.stop_ids = frozenset(eos) | frozenset(params.stop_token_ids)
        self.max_num_tokens = len(self.prompt_token_ids) + params.max_tokens

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.finished else None


@dataclass(slots=True)
class RequestOutput:
    """What one engine step produced for one request (deltas plus running totals).

    A request added with final_only gets one output, when it finishes: its deltas are then the
    whole output (new_token_ids == output_token_ids, new_text == text)."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    text: str
    output_token_ids: list[int]
    prompt_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    new_logprobs: list[dict] = field(default_factory=list)
    output_logprobs: list[dict] = field(default_factory=list)  # every token's so far (when asked)
    num_cached_tokens: int = 0
    version: str = ""
    error: str | None = None
    arrival_time: float = 0.0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None

    @classmethod
    def of(cls, request: Request, new_token_ids: list[int], new_text: str, text: str,
           new_logprobs: list[dict]) -> RequestOutput:
        """The output of `request` now. Positional, in field order (tests/test_engine_outputs.py
        checks it field by field): keywords cost 3x as much, and this runs for every row of every step."""
        status = request.status
        finished = status in _FINISHED
        return cls(request.request_id, new_token_ids, new_text, text, request.output_token_ids,
                   request.prompt_token_ids, finished, status.value if finished else None, request.stop_reason,
                   new_logprobs, request.output_logprobs, request.num_cached_tokens, request.version, request.error,
                   request.arrival_time, request.first_scheduled_time, request.first_token_time)
