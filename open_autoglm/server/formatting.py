"""RequestOutputs -> OpenAI response bodies and server-sent-event chunks (plain dicts, no pydantic:
this runs once per token per request)."""

from __future__ import annotations

import json

from open_autoglm.engine.request import RequestOutput

DONE = "data: [DONE]\n\n"
SHUTDOWN_ABORT = "request aborted: the server is shutting down"


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


# -- logprobs ------------------------------------------------------------------------------------
def completion_logprobs(tokenizer, entries: list[dict], text_offset: int = 0,
                        echo_ids: list[int] | None = None) -> dict:
    """Legacy completions shape: parallel lists tokens / token_logprobs / top_logprobs / text_offset.
    Echoed prompt tokens have no logprob (the engine does not score prompts): null, as OpenAI
    gives for the first prompt token."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict | None] = []
    offsets: list[int] = []
    for tid in echo_ids or []:
        text = token_text(tokenizer, tid)
        tokens.append(text)
        token_logprobs.append(None)
        top_logprobs.append(None)
        offsets.append(text_offset)
        text_offset += len(text)
    for entry in entries:
        text = token_text(tokenizer, entry["token_id"])
        tokens.append(text)
        token_logprobs.append(entry["logprob"])
        top_logprobs.append({token_text(tokenizer, t): lp for t, lp in entry["top"]})
        offsets.append(text_offset)
        text_offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": offsets}


def chat_logprobs(tokenizer, entries: list[dict]) -> dict:
    def item(token_id: int, logprob: float) -> dict:
        text = token_text(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**item(e["token_id"], e["logprob"]), "top_logprobs": [item(t, lp) for t, lp in e["top"]]}
                        for e in entries]}


# -- whole responses -----------------------------------------------------------------------------
def envelope(kind: str, request_id: str, created: int, model: str, fingerprint: str) -> dict:
    return {"id": request_id, "object": kind, "created": created, "model": model, "system_fingerprint": fingerprint}


def completion_choice(out: RequestOutput, index: int, tokenizer, logprobs: bool, echo_text: str | None,
                      token_ids: bool) -> dict:
    echo_ids = out.prompt_token_ids if echo_text is not None else None
    choice = {"index": index, "text": (echo_text or "") + out.text,
              "logprobs": completion_logprobs(tokenizer, out.new_logprobs, 0, echo_ids) if logprobs else None,
              "finish_reason": out.finish_reason, "stop_reason": out.stop_reason}
    if token_ids:
        choice.update(token_ids=list(out.output_token_ids), prompt_token_ids=list(out.prompt_token_ids))
    return choice


def chat_choice(out: RequestOutput, index: int, tokenizer, logprobs: bool, token_ids: bool) -> dict:
    choice = {"index": index, "message": {"role": "assistant", "content": out.text},
              "logprobs": chat_logprobs(tokenizer, out.new_logprobs) if logprobs else None,
              "finish_reason": out.finish_reason, "stop_reason": out.stop_reason}
    if token_ids:
        choice.update(token_ids=list(out.output_token_ids), prompt_token_ids=list(out.prompt_token_ids))
    return choice


def total_usage(num_prompt_tokens: int, finals: dict[int, RequestOutput], num_per_prompt: int) -> dict:
    completion = sum(len(o.output_token_ids) for o in finals.values())
    cached = sum(o.num_cached_tokens for i, o in finals.items() if i % num_per_prompt == 0)
    return usage(num_prompt_tokens, completion, cached)


def fingerprint_of(finals: dict[int, RequestOutput], fallback: str) -> str:
    """The weights version that produced the answer (all choices run under one version unless an
    update landed mid-request; then the first choice's version is reported)."""
    first = finals.get(min(finals)) if finals else None
    return first.version if first is not None and first.version else fallback


def failure(out: RequestOutput) -> tuple[int, str, str]:
    """(status, message, code) of a sequence that ended other than by stop / length.

    An abort says why when the engine recorded a reason (`error`: the update policy abort sets
    "aborted: weights updated to <version>"); an abort without one is the shutdown timeout's,
    the only other abort a client lives to see (one that left reads nothing)."""
    if out.finish_reason == "abort":
        return 503, out.error or SHUTDOWN_ABORT, "aborted"
    return 500, f"generation failed: {out.error}", "engine_error"
