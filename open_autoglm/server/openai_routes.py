"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models, plus /infer.

Every handler follows the same path:
    validate (400) -> tokenize + length checks (400) -> admission (429/503) -> Job
        stream:     EventStream over stream_job (client gone -> aborted)
        otherwise:  collect_job raced against the client's disconnect
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from open_autoglm.engine.chat import chat_prompt_ids
from open_autoglm.engine.request import RequestOutput
from open_autoglm.errors import RequestError
from open_autoglm.sampling_params import MAX_LOGPROBS
from open_autoglm.server import formatting as fmt
from open_autoglm.server.admission import Ticket
from open_autoglm.server.errors import APIError, bad_request, error_body, from_exception
from open_autoglm.server.protocol import ChatCompletionRequest, CompletionRequest, InferRequest
from open_autoglm.server.serving import (
    CLIENT_CLOSED,
    OFF_LOOP_CHARS,
    ClientGone,
    Job,
    admit,
    check_fanout,
    check_model,
    collect_job,
    encode_prompt,
    new_request_id,
    ready_engine,
    resolve_max_tokens,
    sequences_for,
    stream_job,
    unless_disconnected,
)

router = APIRouter()


class EventStream(StreamingResponse):
    """text/event-stream that always closes its generator (aborting the engine work) and gives the
    admission ticket back, however the response ends."""

    def __init__(self, content: AsyncIterator[str], ticket: Ticket) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._content = content
        self._ticket = ticket

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self._content.aclose()
            finally:
                self._ticket.release()


def _seeded(seed: int | None, j: int) -> int | None:
    return None if seed is None else seed + j


def _check_finals(finals: dict[int, RequestOutput]) -> None:
    for out in finals.values():
        if out.finish_reason in ("error", "abort"):
            status, message, code = fmt.failure(out)
            raise APIError(status, message, code=code, counted=True)


async def _run(request: Request, state, job: Job, ticket: Ticket) -> dict[int, RequestOutput] | None:
    """Non-streaming: all choices, or None when the client left (its sequences are aborted)."""
    try:
        finals = await unless_disconnected(request, collect_job(state, job))
    except ClientGone:
        return None
    finally:
        ticket.release()
    _check_finals(finals)
    return finals


# -- /v1/models ----------------------------------------------------------------------------------
@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    state = request.app.state.server
    llm = state.engine.engine if state.engine is not None and state.engine.is_ready else None
    card = {"id": state.model_name, "object": "model", "created": int(state.started_at), "owned_by": "open-autoglm"}
    if llm is not None:
        card.update(root=str(llm.model_path), max_model_len=llm.max_model_len, version=llm.version)
    return {"object": "list", "data": [card]}


# -- /v1/completions -----------------------------------------------------------------------------
def _prompt_list(prompt) -> list[str | list[int]]:
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]
    if not prompt:
        raise bad_request("prompt is empty", "prompt")
    return list(prompt)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    state = request.app.state.server
    check_model(state, body.model)
    if body.suffix:
        raise bad_request("suffix is not supported", "suffix")
    _, llm = ready_engine(state)
    prompts = _prompt_list(body.prompt)
    prompt_ids = [await encode_prompt(llm, p, "prompt") for p in prompts]
    max_tokens = resolve_max_tokens(llm, state.settings, body.max_tokens, 16, prompt_ids)
    seqs = sequences_for(prompt_ids, body.n, lambda j: body.sampling_params(max_tokens, body.logprobs,
                                                                            _seeded(body.seed, j)))
    check_fanout(state, len(seqs))
    job = Job(new_request_id("cmpl"), prompt_ids, seqs)
    echo = [p if isinstance(p, str) else llm.tokenizer.decode(p) for p in prompts] if body.echo else None
    ticket = await admit(request, state, len(seqs))
    if body.stream:
        return EventStream(_completion_events(state, job, body, echo), ticket)
    finals = await _run(request, state, job, ticket)
    if finals is None:
        return Response(status_code=CLIENT_CLOSED)
    tok, logprobs = llm.tokenizer, body.logprobs is not None
    choices = [fmt.completion_choice(finals[i], i, tok, logprobs, echo[i // body.n] if echo else None,
                                     body.return_token_ids) for i in sorted(finals)]
    return JSONResponse({**fmt.envelope("text_completion", job.request_id, int(time.time()), state.model_name,
                                        fmt.fingerprint_of(finals, state.version)),
                         "choices": choices, "usage": fmt.total_usage(job.num_prompt_tokens, finals, body.n)})


async def _completion_events(state, job: Job, body: CompletionRequest, echo: list[str] | None) -> AsyncIterator[str]:
    tok, created, logprobs = state.engine.engine.tokenizer, int(time.time()), body.logprobs is not None
    offsets: dict[int, int] = {}
    finals: dict[int, RequestOutput] = {}
    stream = stream_job(state, job)
    try:
        async for index, out in stream:
            if out.finished and out.finish_reason not in ("stop", "length"):
                yield fmt.sse(_failed_output_body(out))
                break
            first = index not in offsets
            text = (echo[index // body.n] if echo and first else "") + out.new_text
            echo_ids = job.prompt_ids[index // body.n] if echo and first else None
            if not (text or out.finished or (logprobs and out.new_logprobs) or body.return_token_ids):
                continue  # a token that completes no character yet: nothing to show
            choice = {"index": index, "text": text, "finish_reason": out.finish_reason if out.finished else None,
                      "logprobs": fmt.completion_logprobs(tok, out.new_logprobs, offsets.get(index, 0), echo_ids)
                      if logprobs else None}
            offsets[index] = offsets.get(index, 0) + len(text)
            if body.return_token_ids:
                choice["token_ids"] = list(out.new_token_ids)
            chunk = {**fmt.envelope("text_completion", job.request_id, created, state.model_name, out.version),
                     "choices": [choice]}
            if body.include_usage:
                chunk["usage"] = None
            yield fmt.sse(chunk)
            if out.finished:
                finals[index] = out
        else:
            if body.include_usage:
                yield _usage_chunk("text_completion", job, created, state, finals, body.n)
    except Exception as e:
        yield fmt.sse(from_exception(e).body())
    finally:
        await stream.aclose()
    yield fmt.DONE


def _usage_chunk(kind: str, job, created: int, state, finals: dict, n: int) -> str:
    """The last chunk of a stream with stream_options.include_usage: no choices, the totals."""
    return fmt.sse({**fmt.envelope(kind, job.request_id, created, state.model_name,
                                   fmt.fingerprint_of(finals, state.version)),
                    "choices": [], "usage": fmt.total_usage(job.num_prompt_tokens, finals, n)})


def _failed_output_body(out: RequestOutput) -> dict:
    status, message, code = fmt.failure(out)
    return error_body(status, message, code=code)


# -- /v1/chat/completions ------------------------------------------------------------------------
@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    state = request.app.state.server
    check_model(state, body.model)
    _, llm = ready_engine(state)
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")
    if body.top_logprobs is not None and not 0 <= body.top_logprobs <= MAX_LOGPROBS:
        raise bad_request(f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {body.top_logprobs}", "top_logprobs")
    prompt_ids = [await _chat_ids(llm, body.messages, body.add_generation_prompt)]
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = resolve_max_tokens(llm, state.settings, body.requested_max_tokens, None, prompt_ids, param)
    num_top = (body.top_logprobs or 0) if body.logprobs else None
    seqs = sequences_for(prompt_ids, body.n, lambda j: body.sampling_params(max_tokens, num_top, _seeded(body.seed, j)))
    check_fanout(state, len(seqs))
    job = Job(new_request_id("chatcmpl"), prompt_ids, seqs)
    ticket = await admit(request, state, len(seqs))
    if body.stream:
        return EventStream(_chat_events(state, job, body), ticket)
    finals = await _run(request, state, job, ticket)
    if finals is None:
        return Response(status_code=CLIENT_CLOSED)
    choices = [fmt.chat_choice(finals[i], i, llm.tokenizer, body.logprobs, body.return_token_ids)
               for i in sorted(finals)]
    return JSONResponse({**fmt.envelope("chat.completion", job.request_id, int(time.time()), state.model_name,
                                        fmt.fingerprint_of(finals, state.version)),
                         "choices": choices, "usage": fmt.total_usage(job.num_prompt_tokens, finals, body.n)})


async def _chat_ids(llm, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    try:
        if len(str(messages)) > OFF_LOOP_CHARS:  # long conversations: template + tokenize off the loop
            ids = await asyncio.to_thread(chat_prompt_ids, llm.tokenizer, messages, add_generation_prompt)
        else:
            ids = chat_prompt_ids(llm.tokenizer, messages, add_generation_prompt)
    except RequestError as e:
        raise from_exception(e) from None
    if not ids:
        raise bad_request("messages produce an empty prompt", "messages")
    return ids


async def _chat_events(state, job: Job, body: ChatCompletionRequest) -> AsyncIterator[str]:
    tok, created = state.engine.engine.tokenizer, int(time.time())
    finals: dict[int, RequestOutput] = {}

    def chunk(version: str, index: int, delta: dict, finish: str | None = None, logprobs=None) -> str:
        out = {**fmt.envelope("chat.completion.chunk", job.request_id, created, state.model_name, version),
               "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}
        if body.include_usage:
            out["usage"] = None
        return fmt.sse(out)

    stream = stream_job(state, job)
    started: set[int] = set()  # choices whose role chunk went out
    try:
        async for index, out in stream:
            if out.finished and out.finish_reason not in ("stop", "length"):
                yield fmt.sse(_failed_output_body(out))
                break
            if index not in started:
                # The role first, before any token, but only once the choice has an output: then its
                # fingerprint is the version computing it (the server's may be about to switch: drain).
                started.add(index)
                yield chunk(out.version, index, {"role": "assistant", "content": ""})
            if out.new_text or (body.logprobs and out.new_logprobs) or (body.return_token_ids and out.new_token_ids):
                delta = {"content": out.new_text}
                if body.return_token_ids:
                    delta["token_ids"] = list(out.new_token_ids)
                lps = fmt.chat_logprobs(tok, out.new_logprobs) if body.logprobs else None
                yield chunk(out.version, index, delta, logprobs=lps)
            if out.finished:
                finals[index] = out
                yield chunk(out.version, index, {}, out.finish_reason)
        else:
            if body.include_usage:
                yield _usage_chunk("chat.completion.chunk", job, created, state, finals, body.n)
    except Exception as e:
        yield fmt.sse(from_exception(e).body())
    finally:
        await stream.aclose()
    yield fmt.DONE


# -- /infer --------------------------------------------------------------------------------------
@router.post("/infer")
async def infer(body: InferRequest, request: Request) -> Response:
    """`{"input": "text" or [messages], "max_tokens"?, "temperature"?}` -> `{"output": "text", ...}`."""
    state = request.app.state.server
    _, llm = ready_engine(state)
    if isinstance(body.input, str):
        prompt_ids = [await encode_prompt(llm, body.input, "input")]
    else:
        prompt_ids = [await _chat_ids(llm, body.input)]
    max_tokens = resolve_max_tokens(llm, state.settings, body.max_tokens, 128, prompt_ids)
    seqs = sequences_for(prompt_ids, 1, lambda j: body.sampling_params(max_tokens))
    job = Job(new_request_id("infer"), prompt_ids, seqs)
    ticket = await admit(request, state, 1)
    finals = await _run(request, state, job, ticket)
    if finals is None:
        return Response(status_code=CLIENT_CLOSED)
    out = finals[0]
    return JSONResponse({"output": out.text, "finish_reason": out.finish_reason, "model": state.model_name,
                         "system_fingerprint": fmt.fingerprint_of(finals, state.version),
                         "usage": fmt.total_usage(job.num_prompt_tokens, finals, 1)})
