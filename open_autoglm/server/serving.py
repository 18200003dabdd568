"""From a validated API request to engine sequences and back: prompts, admission, streaming, cancel.

One API request fans out into `num_prompts x n` engine sequences ("choices"), choice index
`prompt_index * n + j`, sequence id `<request id>-<index>`. Each sequence is pumped by its own
task into one queue; whoever reads the merged stream stops reading -> every task is cancelled ->
each `AsyncEngine.generate` closes -> the engine aborts the sequence and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from fastapi import Request

from open_autoglm.engine.request import RequestOutput
from open_autoglm.errors import RequestError
from open_autoglm.sampling_params import SamplingParams, SamplingParamsError
from open_autoglm.server.admission import Draining, QueueFull, QueueTimeout, Ticket
from open_autoglm.server.errors import APIError, bad_request, from_exception
from open_autoglm.server.metrics import RequestTimer

if TYPE_CHECKING:
    from open_autoglm.engine.async_engine import AsyncEngine
    from open_autoglm.engine.llm_engine import LLMEngine

T = TypeVar("T")
OFF_LOOP_CHARS = 16_384  # longer texts are tokenized on a worker thread: the loop keeps streaming
CLIENT_CLOSED = 499  # nginx's code: nobody reads it, but access logs show what happened


class ClientGone(Exception):
    """The client closed the connection; nobody will read the answer."""


@dataclass
class Sequence:
    index: int             # choice index in the response
    prompt_index: int
    params: SamplingParams


@dataclass
class Job:
    """A request ready for the engine: tokenized prompts and one Sequence per choice."""

    request_id: str
    prompt_ids: list[list[int]]
    sequences: list[Sequence]
    arrival: float = field(default_factory=time.monotonic)

    @property
    def num_prompt_tokens(self) -> int:  # usage counts each prompt once, however large n is
        return sum(len(ids) for ids in self.prompt_ids)


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


# -- engine access -------------------------------------------------------------------------------
def ready_engine(state) -> tuple[AsyncEngine, LLMEngine]:
    """The engine if it can take work now; otherwise a 503 saying why."""
    if state.draining:
        raise APIError(503, "server is shutting down", code="shutting_down", headers={"Connection": "close"})
    engine = state.engine
    if engine is None or (engine.load_error is None and not engine.ready.is_set()):
        raise APIError(503, "model is still loading; retry shortly", code="model_loading",
                       headers={"Retry-After": "5"})
    if not engine.is_alive:
        raise APIError(503, f"engine is not running: {engine.load_error}", code="engine_dead")
    return engine, engine.engine


def check_model(state, name: str | None) -> None:
    if name is not None and name not in state.model_aliases:
        raise APIError(400, f"model {name!r} does not exist; this server serves {state.model_name!r}",
                       param="model", code="model_not_found")


# -- prompts and lengths -------------------------------------------------------------------------
async def encode_prompt(llm: LLMEngine, prompt: str | list[int], param: str) -> list[int]:
    if isinstance(prompt, str):
        if not prompt:
            raise bad_request(f"{param} is empty", param)
        if len(prompt) > OFF_LOOP_CHARS:
            return await asyncio.to_thread(llm.tokenize, prompt)
        return llm.tokenize(prompt)
    if not prompt:
        raise bad_request(f"{param} is empty", param)
    vocab_size = llm.hf_config.vocab_size
    bad = next((t for t in prompt if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise bad_request(f"{param}: token id {bad} is outside the vocabulary [0, {vocab_size})", param)
    return list(prompt)


def resolve_max_tokens(llm: LLMEngine, settings, requested: int | None, default: int | None,
                       prompt_ids: list[list[int]], param: str = "max_tokens") -> int:
    """The max_tokens every sequence runs with; a request that cannot fit is a 400 naming both numbers."""
    limit = settings.max_tokens_limit
    if requested is not None and limit is not None and requested > limit:
        raise bad_request(f"{param} is {requested}, but this server allows at most {limit}", param)
    max_model_len = llm.max_model_len
    longest = max(len(ids) for ids in prompt_ids)
    if longest >= max_model_len:
        raise APIError(400, f"This model's maximum context length is {max_model_len} tokens, but the prompt "
                            f"has {longest} tokens, which leaves no room to generate. Shorten the prompt.",
                       param="prompt", code="context_length_exceeded")
    if requested is None:
        room = max_model_len - longest
        return max(1, min(default or room, room, limit or room))
    if longest + requested > max_model_len:
        raise APIError(400, f"This model's maximum context length is {max_model_len} tokens. However, you "
                            f"requested {longest + requested} tokens ({longest} in the prompt, {requested} "
                            f"for the completion). Reduce the prompt or {param}.",
                       param=param, code="context_length_exceeded")
    needed = llm.block_manager.blocks_needed(longest + requested)
    if needed > llm.block_manager.num_blocks:
        raise bad_request(f"prompt + {param} = {longest + requested} tokens needs {needed} KV blocks, but the "
                          f"cache holds {llm.block_manager.num_blocks}; lower {param}", param)
    return requested


def sequences_for(prompt_ids: list[list[int]], n: int, make_params) -> list[Sequence]:
    """n choices per prompt; choice j of a seeded request uses seed + j so the n differ but repeat."""
    try:
        return [Sequence(p * n + j, p, make_params(j)) for p in range(len(prompt_ids)) for j in range(n)]
    except (SamplingParamsError, RequestError) as e:
        raise from_exception(e) from None


def check_fanout(state, num_sequences: int) -> None:
    limit = min(state.settings.max_n, state.admission.max_running)
    if num_sequences > limit:
        raise bad_request(f"this request needs {num_sequences} sequences (prompts x n); the limit is {limit}", "n")


# -- admission and disconnects -------------------------------------------------------------------
async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
        await asyncio.sleep(0.01)  # not expected once the body is read; never spin if a server sends more


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run `work`; if the client goes away first, cancel it (aborting its sequences) and raise ClientGone."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
        watcher.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)
    if task.cancelled():
        raise ClientGone()
    return task.result()


async def admit(request: Request, state, weight: int) -> Ticket:
    """A ticket for `weight` sequences, or the right refusal (429 / 503)."""
    metrics, version = state.metrics, state.version
    try:
        return await unless_disconnected(request, state.admission.acquire(weight))
    except QueueFull as e:
        metrics.fail(version, "queue_full", weight)
        raise APIError(429, str(e), code="queue_full", headers={"Retry-After": "1"},
                       counted=True) from None
    except QueueTimeout as e:
        metrics.fail(version, "queue_timeout", weight)
        raise APIError(503, str(e), code="queue_timeout", headers={"Retry-After": "1"},
                       counted=True) from None
    except Draining as e:
        metrics.fail(version, "shutting_down", weight)
        raise APIError(503, str(e), code="shutting_down", headers={"Connection": "close"},
                       counted=True) from None
    except ClientGone:
        metrics.fail(version, "client_disconnect", weight)
        raise APIError(CLIENT_CLOSED, "client closed the connection while queued", counted=True) from None


# -- running sequences ---------------------------------------------------------------------------
async def stream_job(state, job: Job) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Merged outputs of every sequence of `job` as (choice index, output), until all finished.

    Raises APIError if a sequence could not start (bad input the engine caught) or the engine died.
    Closing this iterator early aborts every sequence still running."""
    engine: AsyncEngine = state.engine
    merged: asyncio.Queue = asyncio.Queue()
    timers = [RequestTimer(state.metrics, job.arrival, len(job.prompt_ids[s.prompt_index])) for s in job.sequences]

    async def pump(seq: Sequence) -> None:
        seq_id = f"{job.request_id}-{seq.index}"
        state.active_ids.add(seq_id)
        try:
            async for out in engine.generate(job.prompt_ids[seq.prompt_index], seq.params, request_id=seq_id):
                merged.put_nowait((seq.index, out))
        except Exception as e:
            merged.put_nowait((seq.index, e))
        finally:
            state.active_ids.discard(seq_id)

    tasks = [asyncio.create_task(pump(seq)) for seq in job.sequences]
    reason, remaining = "client_disconnect", len(tasks)
    try:
        while remaining:
            index, item = await merged.get()
            if isinstance(item, BaseException):
                reason = "invalid_request" if isinstance(item, (RequestError, SamplingParamsError)) else "engine_error"
                error = _as_api_error(item)
                error.counted = True  # below, once per sequence
                raise error
            timers[index].observe(item, time.monotonic())
            remaining -= item.finished
            yield index, item
    finally:
        # Synchronous cleanup first: inside a cancelled anyio scope (Starlette's streaming response
        # when the client hangs up) every later await raises CancelledError again.
        for task in tasks:
            task.cancel()  # -> generate() closes -> the engine aborts the sequence
        for timer in timers:
            if timer.done:
                continue
            if reason == "invalid_request":  # never reached the engine: no tokens to count
                timer.done = True
                state.metrics.fail(state.version, reason)
            else:
                timer.abandon(state.version, reason)
        await asyncio.gather(*tasks, return_exceptions=True)


def _as_api_error(e: BaseException) -> APIError:
    if isinstance(e, (RequestError, SamplingParamsError, APIError)):
        return from_exception(e)
    return APIError(503 if type(e).__name__ == "EngineDeadError" else 500,
                    f"{type(e).__name__}: {e}", code="engine_error")


async def collect_job(state, job: Job) -> dict[int, RequestOutput]:
    """Run every sequence to the end; finished outputs by choice index (with all logprobs gathered)."""
    finals: dict[int, RequestOutput] = {}
    logprobs: dict[int, list[dict]] = {s.index: [] for s in job.sequences}
    stream = stream_job(state, job)
    try:
        async for index, out in stream:
            logprobs[index].extend(out.new_logprobs)
            if out.finished:
                out.new_logprobs = logprobs[index]  # the final output carries the whole list
                finals[index] = out
    finally:
        await stream.aclose()
    return finals
