"""In-process pieces of the server: admission control, drain, failures inside one request, the CLI."""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from open_autoglm.config import EngineConfig
from open_autoglm.engine.request import RequestOutput
from open_autoglm.errors import RequestError
from open_autoglm.server.admission import AdmissionController, Draining, QueueFull, QueueTimeout


# -- admission ---------------------------------------------------------------------------------
def run(coro):
    return asyncio.run(coro)


def test_admission_admits_queues_fifo_and_refuses_when_full():
    async def main():
        ac = AdmissionController(max_running=2, max_queued=2)
        a, b = await ac.acquire(), await ac.acquire()
        assert (ac.num_running, ac.num_queued) == (2, 0)
        waiting = [asyncio.create_task(ac.acquire()) for _ in range(2)]
        await asyncio.sleep(0)
        assert ac.num_queued == 2
        with pytest.raises(QueueFull):
            await ac.acquire()
        a.release()
        a.release()  # idempotent
        first = await waiting[0]
        assert not waiting[1].done() and (ac.num_running, ac.num_queued) == (2, 1)
        b.release()
        second = await waiting[1]
        first.release(), second.release()
        assert (ac.num_running, ac.num_queued) == (0, 0)

    run(main())


def test_admission_timeout_cancel_and_close_leave_no_trace():
    async def main():
        ac = AdmissionController(max_running=1, max_queued=4, queue_timeout=0.05)
        held = await ac.acquire()
        with pytest.raises(QueueTimeout):
            await ac.acquire()
        assert ac.num_queued == 0
        ac.queue_timeout = None
        gone = asyncio.create_task(ac.acquire())
        await asyncio.sleep(0)
        gone.cancel()  # the client left while waiting
        await asyncio.gather(gone, return_exceptions=True)
        assert ac.num_queued == 0
        left = asyncio.create_task(ac.acquire())
        await asyncio.sleep(0)
        ac.close()
        with pytest.raises(Draining):
            await left
        with pytest.raises(Draining):
            await ac.acquire()
        held.release()
        assert (ac.num_running, ac.num_queued) == (0, 0)

    run(main())


def test_admission_big_request_waits_its_turn_and_never_exceeds_capacity():
    async def main():
        ac = AdmissionController(max_running=4, max_queued=8)
        small = await ac.acquire(3)
        big = asyncio.create_task(ac.acquire(4))     # must wait for all 4 slots
        await asyncio.sleep(0)
        late = asyncio.create_task(ac.acquire(1))    # would fit, but FIFO: behind the big one
        await asyncio.sleep(0)
        assert not big.done() and not late.done()
        small.release()
        ticket = await big
        assert ac.num_running == 4 and not late.done()
        ticket.release()
        (await late).release()
        with pytest.raises(ValueError):
            await ac.acquire(5)

    run(main())


# -- an app around a scripted fake engine ------------------------------------------------------
class FakeEngine:
    """The AsyncEngine surface the server uses; each request's outputs come from `script`."""

    def __init__(self, tokenizer, script, ready: bool = True, load_error: BaseException | None = None) -> None:
        self.config = EngineConfig(max_num_seqs=4, max_queued_requests=4)
        self.ready = threading.Event()
        if ready:
            self.ready.set()
        self.load_error = load_error
        self.script = script
        self.aborted: list[str] = []
        block_manager = SimpleNamespace(num_blocks=64, block_size=16, blocks_needed=lambda n: -(-n // 16))
        self.engine = SimpleNamespace(
            tokenizer=tokenizer, max_model_len=128, version="v-test", model_path=Path("/fake"), device="cpu",
            hf_config=SimpleNamespace(vocab_size=len(tokenizer)), block_manager=block_manager,
            tokenize=lambda s: tokenizer.encode(s), stats=lambda: dict(
                num_running=0, num_waiting=0, kv_cache_usage=0.0, num_free_blocks=64, num_blocks=64,
                prefix_cache_queries=0, prefix_cache_hits=0))

    @property
    def is_alive(self) -> bool:
        return self.load_error is None

    @property
    def is_ready(self) -> bool:
        return self.ready.is_set() and self.is_alive

    async def generate(self, prompt, params, request_id=None):
        for out in self.script(request_id, prompt, params):
            yield out

    async def call(self, fn):
        return fn(self.engine)

    def abort_nowait(self, request_id: str) -> None:
        self.aborted.append(request_id)


def output(rid, prompt, ids, finish=None, error=None, version="v-test") -> RequestOutput:
    return RequestOutput(request_id=rid, new_token_ids=ids[-1:], new_text="x", text="x" * len(ids),
                         output_token_ids=ids, prompt_token_ids=prompt, finished=finish is not None,
                         finish_reason=finish, version=version, error=error)


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_checkpoint("llama"))


def client_for(engine) -> httpx.AsyncClient:
    from open_autoglm.server import create_app

    app = create_app(engine=engine)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def events(text: str) -> list:
    return [d if d == "[DONE]" else json.loads(d) for line in text.splitlines()
            if line.startswith("data: ") for d in [line[6:]]]


def failing_script(rid, prompt, params):
    if params.max_tokens == 7:
        raise RequestError("max_tokens", "the engine refused it")
    if params.max_tokens == 5:
        raise RuntimeError("kaboom")
    yield output(rid, prompt, [3])
    if params.max_tokens == 3:
        yield output(rid, prompt, [3, 4], finish="error", error="RuntimeError: step failed")
    else:
        yield output(rid, prompt, [3, 4], finish="length")


def test_a_failure_inside_one_request_ends_only_that_request(tokenizer):
    async def main():
        async with client_for(FakeEngine(tokenizer, failing_script)) as c:
            r = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3})
            assert r.status_code == 500 and r.json()["error"]["code"] == "engine_error"
            assert "step failed" in r.json()["error"]["message"]
            r = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "stream": True})
            assert r.status_code == 200
            got = events(r.text)
            assert got[0]["choices"][0]["text"] == "x" and got[1]["error"]["code"] == "engine_error"
            assert got[-1] == "[DONE]" and len(got) == 3
            r = await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "a"}],
                                                           "max_tokens": 3, "stream": True})
            got = events(r.text)
            assert got[-2]["error"]["type"] == "server_error" and got[-1] == "[DONE]"
            r = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 5})
            assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
            r = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 7})
            assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
            r = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})  # still serving
            assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
            assert r.json()["system_fingerprint"] == "v-test"
            metrics = (await c.get("/metrics")).text
            assert 'reason="engine_error"' in metrics and 'reason="invalid_request"' in metrics

    run(main())


def aborting_script(rid, prompt, params):
    """max_tokens 4: aborted by a weight update (policy abort); 6: by the shutdown timeout (no reason)."""
    yield output(rid, prompt, [3])
    reason = "aborted: weights updated to v9" if params.max_tokens == 4 else None
    yield output(rid, prompt, [3, 4], finish="abort", error=reason)


def test_an_aborted_request_is_told_its_own_reason(tokenizer):
    chat = {"messages": [{"role": "user", "content": "a"}]}
    cases = [(4, "aborted: weights updated to v9"), (6, "request aborted: the server is shutting down")]

    async def main():
        async with client_for(FakeEngine(tokenizer, aborting_script)) as c:
            for max_tokens, message in cases:
                for route, body in (("/v1/completions", {"prompt": "hi"}), ("/v1/chat/completions", chat)):
                    r = await c.post(route, json={**body, "max_tokens": max_tokens})
                    assert r.status_code == 503 and r.json()["error"] == {
                        "message": message, "type": "service_unavailable", "param": None, "code": "aborted"}
                    r = await c.post(route, json={**body, "max_tokens": max_tokens, "stream": True})
                    got = events(r.text)
                    assert got[-1] == "[DONE]" and got[-2]["error"]["code"] == "aborted"
                    assert got[-2]["error"]["message"] == message, (route, got)

    run(main())


def drained_script(rid, prompt, params):
    """A request held by a drain: the server still names v-test, its tokens come from v-new."""
    yield output(rid, prompt, [3], version="v-new")
    yield output(rid, prompt, [3, 4], finish="length", version="v-new")


def test_every_chat_stream_chunk_names_the_version_that_produced_it(tokenizer):
    async def main():
        async with client_for(FakeEngine(tokenizer, drained_script)) as c:
            body = {"messages": [{"role": "user", "content": "a"}], "max_tokens": 2, "n": 2, "stream": True,
                    "stream_options": {"include_usage": True}}
            got = events((await c.post("/v1/chat/completions", json=body)).text)
        chunks = got[:-1]
        roles = [e for e in chunks if e["choices"] and "role" in e["choices"][0]["delta"]]
        assert sorted(e["choices"][0]["index"] for e in roles) == [0, 1]
        for index in (0, 1):  # the role chunk comes first for its choice
            mine = [e for e in chunks if e["choices"] and e["choices"][0]["index"] == index]
            assert mine[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert {e["system_fingerprint"] for e in chunks} == {"v-new"}

    run(main())


def test_health_while_loading_and_after_a_failed_load(tokenizer):
    async def main():
        async with client_for(FakeEngine(tokenizer, failing_script, ready=False)) as c:
            r = await c.get("/health")
            assert r.status_code == 503 and r.json()["status"] == "loading"
            r = await c.post("/v1/completions", json={"prompt": "hi"})
            assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
            assert (await c.get("/metrics")).status_code == 200
        dead = FakeEngine(tokenizer, failing_script, ready=False, load_error=FileNotFoundError("no weights"))
        async with client_for(dead) as c:
            r = await c.get("/health")
            assert r.status_code == 503 and r.json() == {"status": "dead", "error": "no weights"}
            assert (await c.post("/v1/completions", json={"prompt": "hi"})).json()["error"]["code"] == "engine_dead"

    run(main())


def test_drain_aborts_what_outlives_the_timeout(tokenizer):
    from open_autoglm.server.app import ServerSettings, ServerState, drain

    async def main():
        engine = FakeEngine(tokenizer, failing_script)
        state = ServerState(engine.config, ServerSettings(), engine)
        ticket = await state.admission.acquire(1)
        state.active_ids.add("cmpl-1-0")
        engine.abort_nowait = lambda rid: (engine.aborted.append(rid), ticket.release())
        await drain(state, 0.05)
        assert state.draining and engine.aborted == ["cmpl-1-0"] and state.admission.num_running == 0
        with pytest.raises(Draining):
            await state.admission.acquire(1)

    run(main())


# -- the CLI -----------------------------------------------------------------------------------
def test_serve_parser_covers_server_and_engine_options():
    from open_autoglm.server.cli import add_serve_parser, settings_from_args

    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--model", "m", "--port", "9000", "--api-key", "k", "--queue-timeout", "2.5",
                              "--max-queued-requests", "7", "--max-tokens-limit", "100", "--no-access-log"])
    settings = settings_from_args(args)
    assert (settings.api_key, settings.queue_timeout, settings.max_tokens_limit) == ("k", 2.5, 100)
    assert (args.port, args.model, args.max_queued_requests, args.access_log) == (9000, "m", 7, False)
    help_text = parser._subparsers._group_actions[0].choices["serve"].format_help()
    for flag in ("--ssl-certfile", "--shutdown-timeout", "--max-body-bytes", "--max-num-seqs", "--config"):
        assert flag in help_text


def test_default_model_name_matches_the_catalog():
    from open_autoglm.models.catalog import DEFAULT_MODEL
    from open_autoglm.server.app import DEFAULT_MODEL_NAME

    assert DEFAULT_MODEL_NAME == DEFAULT_MODEL
