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
        return self.value in ("stop", "length", "abort", "error")


@dataclass
class Request:
    """One sequence. `num_computed_tokens` of `all_token_ids` have their KV in the cache.

    prompt + output = all tokens; the scheduler's only rule is to bring num_computed_tokens up
    to num_tokens (prefill, chunked prefill, decode and recompute after preemption alike).
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


@dataclass
class RequestOutput:
    """What one engine step produced for one request (deltas plus running totals)."""

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
