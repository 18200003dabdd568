"""The OpenAI-compatible API against a real server process, driven by the official openai client."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_server_harness import API_KEY, MAIN_ARGS, shared_server

from open_autoglm.sampling_params import SamplingParams

PROMPTS = ["Hello world", "The quick brown fox", [5, 17, 42, 99, 100, 7]]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Paged attention?"}]


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint):
    return tiny_checkpoint("llama")


@pytest.fixture(scope="module")
def server(model_dir):
    return shared_server(model_dir, *MAIN_ARGS)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def llm(model_dir):
    from open_autoglm.llm import LLM

    return LLM(model=str(model_dir), device="cpu", num_kv_blocks=64)


def sse_events(response: httpx.Response) -> list:
    """Parsed `data:` payloads of an event stream ([DONE] kept as the string)."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_health_and_models(server, client, model_dir, llm):
    health = httpx.get(server.url + "/health").json()
    assert health == {"status": "ok", "model": str(model_dir), "version": llm.version}
    models = client.models.list().data
    assert [m.id for m in models] == [str(model_dir)]
    assert models[0].model_extra["version"] == llm.version


def test_greedy_completions_match_python_api(client, model_dir, llm):
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    expected = llm.generate(PROMPTS, params)
    for prompt, want in zip(PROMPTS, expected):
        got = client.completions.create(model=str(model_dir), prompt=prompt, max_tokens=8, temperature=0,
                                        extra_body={"ignore_eos": True, "return_token_ids": True})
        choice = got.choices[0]
        assert choice.model_extra["token_ids"] == want.output_token_ids
        assert choice.text == want.text
        assert choice.finish_reason == "length"
        assert got.system_fingerprint == llm.version
        assert got.usage.prompt_tokens == len(want.prompt_token_ids)
        assert got.usage.completion_tokens == 8 and got.usage.total_tokens == got.usage.prompt_tokens + 8
    batch = client.completions.create(model=model_dir.name, prompt=[PROMPTS[0], PROMPTS[1]], max_tokens=8,
                                      temperature=0, extra_body={"ignore_eos": True})
    assert [c.index for c in batch.choices] == [0, 1]
    assert [c.text for c in batch.choices] == [expected[0].text, expected[1].text]


def test_greedy_chat_matches_python_api(client, model_dir, llm):
    want = llm.chat(CHAT, SamplingParams(max_tokens=8, temperature=0))[0]
    got = client.chat.completions.create(model=str(model_dir), messages=CHAT, max_completion_tokens=8, temperature=0)
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want.text
    assert got.choices[0].finish_reason == want.finish_reason
    assert got.usage.prompt_tokens == len(want.prompt_token_ids)
    assert got.usage.completion_tokens == len(want.output_token_ids)
    assert got.system_fingerprint == llm.version


def test_streaming_completion_equals_non_streaming(client, model_dir):
    kwargs = dict(model=str(model_dir), prompt="Once upon a time", max_tokens=10, temperature=0,
                  extra_body={"ignore_eos": True})
    full = client.completions.create(**kwargs)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text_chunks, usage_chunk = chunks[:-1], chunks[-1]
    assert "".join(c.choices[0].text for c in text_chunks) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert usage_chunk.choices == [] and usage_chunk.usage.model_dump(include={"prompt_tokens", "completion_tokens"}) \
        == full.usage.model_dump(include={"prompt_tokens", "completion_tokens"})
    assert all(c.usage is None for c in text_chunks)
    assert {c.system_fingerprint for c in chunks} == {full.system_fingerprint}


def test_streaming_chat_event_order(server, model_dir):
    body = {"model": str(model_dir), "messages": CHAT, "max_tokens": 6, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=server.headers) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    role, *deltas, finish, usage = events[:-1]
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(set(d["choices"][0]["delta"]) == {"content"} and d["choices"][0]["finish_reason"] is None for d in deltas)
    assert finish["choices"][0]["delta"] == {} and finish["choices"][0]["finish_reason"] == "length"
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 6
    assert all(e["object"] == "chat.completion.chunk" and e["system_fingerprint"] for e in events[:-1])


def test_n_choices_seeded_and_greedy(client, model_dir):
    kwargs = dict(model=str(model_dir), prompt="Prefix caching", max_tokens=6, n=3, temperature=1.0, seed=7,
                  extra_body={"ignore_eos": True})
    first, again = client.completions.create(**kwargs), client.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]  # seed, seed+1, seed+2: repeatable
    assert len({c.text for c in first.choices}) > 1                            # ... and not all the same
    prompt_len = client.completions.create(model=str(model_dir), prompt="Prefix caching", max_tokens=1).usage.prompt_tokens
    assert first.usage.prompt_tokens == prompt_len and first.usage.completion_tokens == 18
    greedy = client.chat.completions.create(model=str(model_dir), messages=CHAT, max_tokens=5, n=2, temperature=0)
    assert greedy.choices[0].message.content == greedy.choices[1].message.content


def test_completion_logprobs_and_echo(client, model_dir):
    got = client.completions.create(model=str(model_dir), prompt="Hello world", max_tokens=5, temperature=0,
                                    logprobs=3, extra_body={"ignore_eos": True})
    lp = got.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == got.choices[0].text
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert len(top) <= 3 and chosen <= 0
        assert chosen == pytest.approx(max(top.values()), abs=1e-5)  # greedy picks the most likely
    echoed = client.completions.create(model=str(model_dir), prompt="Hello world", max_tokens=5, temperature=0,
                                       logprobs=1, echo=True, extra_body={"ignore_eos": True})
    assert echoed.choices[0].text == "Hello world" + got.choices[0].text
    elp = echoed.choices[0].logprobs
    num_prompt = echoed.usage.prompt_tokens
    assert len(elp.tokens) == num_prompt + 5 and elp.token_logprobs[0] is None
    assert elp.token_logprobs[num_prompt:] == pytest.approx(lp.token_logprobs, abs=1e-5)


def test_chat_logprobs(client, model_dir):
    got = client.chat.completions.create(model=str(model_dir), messages=CHAT, max_tokens=4, temperature=0,
                                         logprobs=True, top_logprobs=2)
    content = got.choices[0].logprobs.content
    assert len(content) == got.usage.completion_tokens
    assert all(len(c.top_logprobs) == 2 and c.logprob <= 0 and c.bytes == list(c.token.encode()) for c in content)


def test_infer_endpoint(server):
    r = httpx.post(server.url + "/infer", json={"input": "Hello world", "max_tokens": 4, "temperature": 0},
                   headers=server.headers)
    assert r.status_code == 200
    body = r.json()
    assert isinstance(body["output"], str) and body["usage"]["completion_tokens"] <= 4 and body["system_fingerprint"]
    r = httpx.post(server.url + "/infer", json={"input": CHAT, "max_tokens": 3}, headers=server.headers)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3


def _scrape(server) -> dict[tuple, float]:
    text = httpx.get(server.url + "/metrics").text
    values = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            values[(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k not in ("model", "version"))))] = s.value
    return values


def _delta(before: dict, after: dict, name: str, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_metrics_count_what_was_sent(server, client, model_dir):
    before = _scrape(server)
    usages = [client.completions.create(model=str(model_dir), prompt=f"metric probe {i}", max_tokens=3 + i,
                                        temperature=0, extra_body={"ignore_eos": True}).usage for i in range(3)]
    after = _scrape(server)
    assert _delta(before, after, "autoglm_prompt_tokens_total") == sum(u.prompt_tokens for u in usages)
    assert _delta(before, after, "autoglm_generation_tokens_total") == sum(u.completion_tokens for u in usages) == 12
    assert _delta(before, after, "autoglm_request_success_total", finished_reason="length") == 3
    for name in ("autoglm_e2e_request_latency_seconds_count", "autoglm_time_to_first_token_seconds_count",
                 "autoglm_request_queue_time_seconds_count"):
        assert _delta(before, after, name) == 3
    assert _delta(before, after, "autoglm_inter_token_latency_seconds_count") == 12 - 3
    assert _delta(before, after, "autoglm_prefix_cache_queries_total") >= sum(u.prompt_tokens for u in usages)
    assert after[("autoglm_kv_free_blocks", ())] == after[("autoglm_kv_total_blocks", ())] == 1024
    assert after[("autoglm_num_requests_running", ())] == 0
    text = httpx.get(server.url + "/metrics").text
    assert f'model="{model_dir}"' in text and 'version="' in text


def test_disconnect_while_waiting_for_non_streaming_answer_aborts(server, model_dir):
    before = _scrape(server)
    body = {"model": str(model_dir), "prompt": "a long answer", "max_tokens": 480, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, headers=server.headers, timeout=httpx.Timeout(5, read=0.3))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        kv = httpx.get(server.url + "/v1/debug/kv", headers=server.headers).json()
        if kv["active_ids"] == 0 and kv["num_free_blocks"] == kv["num_blocks"]:
            break
        time.sleep(0.05)
    assert kv["active_ids"] == 0 and kv["num_free_blocks"] == kv["num_blocks"] and kv["admitted_sequences"] == 0
    after = _scrape(server)
    assert _delta(before, after, "autoglm_request_failure_total", reason="client_disconnect") == 1
    assert 0 < _delta(before, after, "autoglm_generation_tokens_total") < 480
