"""Bad input gets exact status codes and OpenAI error bodies, never a 500; the server keeps serving."""

from __future__ import annotations

import httpx
import openai
import pytest
from test_server_harness import API_KEY, MAIN_ARGS, shared_server

MAX_MODEL_LEN = 512  # the tiny checkpoint's context length


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint):
    return tiny_checkpoint("llama")


@pytest.fixture(scope="module")
def server(model_dir):
    return shared_server(model_dir, *MAIN_ARGS)


def post(server, path: str, body=None, content: bytes | None = None, headers: dict | None = None) -> httpx.Response:
    headers = {**server.headers, **(headers or {})}
    if content is not None:
        return httpx.post(server.url + path, content=content, headers={"content-type": "application/json", **headers})
    return httpx.post(server.url + path, json=body, headers=headers)


def assert_error(r: httpx.Response, status: int, param: str | None = "any", code: str | None = "any") -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if param != "any":
        assert body["error"]["param"] == param, body
    if code != "any":
        assert body["error"]["code"] == code, body
    return body["error"]


OK_COMPLETION = {"prompt": "Hello", "max_tokens": 2}
OK_CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

BAD_COMPLETIONS = [
    ({"max_tokens": "5"}, "max_tokens"),           # wrong types: no coercion
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"temperature": "hot"}, "temperature"),
    ({"stream": "yes"}, "stream"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"n": True}, "n"),
    ({"max_tokens": -1}, "max_tokens"),            # out of range
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 2**70}, "max_tokens"),
    ({"n": 0}, "n"),
    ({"n": 1000}, "n"),
    ({"temperature": -0.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_k": -7}, "top_k"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"logprobs": 50}, "logprobs"),
    ({"seed": 2**64}, "seed"),
    ({"stop": [""]}, "stop"),
    ({"prompt": ""}, "prompt"),                    # empty prompts
    ({"prompt": []}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": [10**6]}, "prompt"),               # token id outside the vocabulary
    ({"prompt": "word " * 600}, "prompt"),         # prompt alone over the context
    ({"suffix": "x"}, "suffix"),
]


@pytest.mark.parametrize("change,param", BAD_COMPLETIONS, ids=[f"{list(c)[0]}={str(list(c.values())[0])[:12]}" for c, _ in BAD_COMPLETIONS])
def test_bad_completion_fields_are_400(server, change, param):
    assert_error(post(server, "/v1/completions", {**OK_COMPLETION, **change}), 400, param)


def test_prompt_plus_max_tokens_over_context_names_both_numbers(server):
    err = assert_error(post(server, "/v1/completions", {"prompt": "Hello world", "max_tokens": 600}), 400,
                       "max_tokens", "context_length_exceeded")
    assert str(MAX_MODEL_LEN) in err["message"] and "600" in err["message"]
    err = assert_error(post(server, "/v1/chat/completions", {**OK_CHAT, "max_completion_tokens": 10**6}), 400,
                       "max_completion_tokens", "context_length_exceeded")
    assert str(MAX_MODEL_LEN) in err["message"] and str(10**6) in err["message"]


@pytest.mark.parametrize("change,param", [
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"content": "no role"}]}, "messages[0]"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 99}, "top_logprobs"),
    ({"max_completion_tokens": -3}, "max_completion_tokens"),
])
def test_bad_chat_fields_are_400(server, change, param):
    assert_error(post(server, "/v1/chat/completions", {**OK_CHAT, **change}), 400, param)


def test_malformed_json_missing_fields_and_nan(server):
    assert_error(post(server, "/v1/completions", content=b'{"prompt": "x", '), 400, None)
    assert_error(post(server, "/v1/completions", content=b'[1, 2]'), 400, None)
    assert_error(post(server, "/v1/completions", content=b'{"prompt": "x", "temperature": NaN}'), 400, "temperature")
    assert_error(post(server, "/v1/completions", {"max_tokens": 3}), 400, "prompt")
    assert_error(post(server, "/infer", {"inputs": "typo"}), 400, "input")


def test_unknown_model_and_route(server):
    assert_error(post(server, "/v1/completions", {**OK_COMPLETION, "model": "gpt-9"}), 400, "model", "model_not_found")
    assert_error(httpx.get(server.url + "/v1/nothing", headers=server.headers), 404)
    assert_error(httpx.get(server.url + "/v1/completions", headers=server.headers), 405)


def test_streaming_request_with_bad_input_fails_before_streaming(server):
    r = post(server, "/v1/completions", {**OK_COMPLETION, "stream": True, "max_tokens": 10**5})
    assert r.headers["content-type"].startswith("application/json")
    assert_error(r, 400, "max_tokens")


def test_api_key_required(server, model_dir):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {API_KEY}"},
                    {"Authorization": API_KEY}):
        r = httpx.post(server.url + "/v1/completions", json=OK_COMPLETION, headers=headers)
        assert_error(r, 401, None, "invalid_api_key")
        assert r.headers["www-authenticate"] == "Bearer"
    assert_error(httpx.get(server.url + "/v1/models"), 401)
    assert_error(httpx.post(server.url + "/infer", json={"input": "x"}), 401)
    assert httpx.get(server.url + "/health").status_code == 200   # probes need no key
    assert httpx.get(server.url + "/metrics").status_code == 200
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=str(model_dir), prompt="x", max_tokens=1)


def test_body_size_limit(server):
    big = {"prompt": "x" * 70_000, "max_tokens": 1}
    assert_error(post(server, "/v1/completions", big), 413, None, "body_too_large")

    def chunks():  # no Content-Length: the limit holds for chunked bodies too
        yield b'{"prompt": "'
        for _ in range(80):
            yield b"y" * 1000
        yield b'"}'

    r = httpx.post(server.url + "/v1/completions", content=chunks(), headers={**server.headers, "content-type": "application/json"})
    assert_error(r, 413, None, "body_too_large")


def test_openai_client_sees_bad_request_errors(server, model_dir):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=str(model_dir), prompt="x", max_tokens=1, temperature=-1)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="unknown", messages=[{"role": "user", "content": "x"}])


def test_server_still_serves_after_bad_input(server):
    r = post(server, "/v1/completions", OK_COMPLETION)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] is not None
    text = httpx.get(server.url + "/metrics").text
    assert 'autoglm_request_failure_total' in text


def test_refusals_are_counted_once(server):
    from prometheus_client.parser import text_string_to_metric_families

    def counts() -> dict[str, float]:
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(httpx.get(server.url + "/metrics").text):
            for s in family.samples:
                if s.name == "autoglm_request_failure_total":
                    out[s.labels["reason"]] = out.get(s.labels["reason"], 0.0) + s.value
        return out

    before = counts()
    post(server, "/v1/completions", {"prompt": "x", "max_tokens": "many"})          # pydantic
    post(server, "/v1/completions", {"prompt": "x", "max_tokens": 2, "top_p": 0})    # SamplingParams
    post(server, "/v1/completions", {"prompt": "x", "max_tokens": 600})              # context length
    post(server, "/v1/completions", {"prompt": "x" * 70_000})                        # 413 at the gate
    httpx.post(server.url + "/v1/completions", json=OK_COMPLETION)                    # 401
    after = counts()
    assert after.get("invalid_request", 0) - before.get("invalid_request", 0) == 4
    assert after.get("unauthorized", 0) - before.get("unauthorized", 0) == 1
