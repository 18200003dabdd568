"""Load, cancellation, admission control and graceful shutdown against real server processes."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time

import httpx
import pytest
from test_server_harness import MAIN_ARGS, ServerProcess, shared_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint):
    return tiny_checkpoint("llama")


async def stream_completion(client: httpx.AsyncClient, body: dict, disconnect_after: int | None = None,
                            started: asyncio.Event | None = None) -> dict:
    """Read one streaming completion; returns tokens, finish reason, errors, whether [DONE] came.
    With disconnect_after=k, hang up once k tokens have arrived; `started` is set at the first token."""
    result = {"status": None, "token_ids": [], "finish_reason": None, "errors": [], "done": False, "hung_up": False}
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True, "return_token_ids": True}) as r:
        result["status"] = r.status_code
        if r.status_code != 200:
            result["errors"].append(json.loads(await r.aread()))
            return result
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                result["done"] = True
                break
            chunk = json.loads(line[6:])
            if "error" in chunk:
                result["errors"].append(chunk)
                continue
            choice = chunk["choices"][0]
            result["token_ids"] += choice.get("token_ids", [])
            if started is not None and result["token_ids"]:
                started.set()
            result["finish_reason"] = choice["finish_reason"] or result["finish_reason"]
            if disconnect_after is not None and len(result["token_ids"]) >= disconnect_after:
                result["hung_up"] = True
                return result  # leaving the block closes the connection mid-stream
    return result


def failures(server, reason: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(httpx.get(server.url + "/metrics").text):
        for s in family.samples:
            if s.name == "autoglm_request_failure_total" and s.labels.get("reason") == reason:
                total += s.value
    return total


def wait_kv_idle(server, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        kv = httpx.get(server.url + "/v1/debug/kv", headers=server.headers).json()
        idle = kv["num_free_blocks"] == kv["num_blocks"] and kv["active_ids"] == 0 and kv["admitted_sequences"] == 0
        if idle or time.monotonic() > deadline:
            return kv
        time.sleep(0.1)


def test_200_concurrent_streams_a_third_hang_up(model_dir):
    server = shared_server(model_dir, *MAIN_ARGS)
    disconnect_before = failures(server, "client_disconnect")
    hang_up = set(random.Random(0).sample(range(200), 67))

    async def main():
        limits = httpx.Limits(max_connections=250, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=server.url, headers=server.headers, limits=limits, timeout=120) as client:
            jobs = []
            for i in range(200):
                body = {"prompt": f"request number {i}", "temperature": 0, "ignore_eos": True,
                        "max_tokens": 400 if i in hang_up else 6}
                jobs.append(stream_completion(client, body, disconnect_after=1 if i in hang_up else None))
            return await asyncio.gather(*jobs)

    results = asyncio.run(main())
    for i, r in enumerate(results):
        assert r["status"] == 200 and not r["errors"], r
        if i in hang_up:
            assert r["hung_up"]
        else:
            assert r["done"] and r["finish_reason"] == "length" and len(r["token_ids"]) == 6, r
    kv = wait_kv_idle(server)
    assert kv["num_free_blocks"] == kv["num_blocks"], kv            # every KV block came back
    assert kv["active_ids"] == 0 and kv["admitted_sequences"] == 0 and kv["num_running"] == 0, kv
    assert failures(server, "client_disconnect") - disconnect_before == len(hang_up)
    text = httpx.get(server.url + "/metrics").text
    assert f"autoglm_kv_free_blocks{{model=\"{model_dir}\"" in text


def test_full_queue_answers_429_and_admitted_requests_complete(model_dir):
    server = ServerProcess(model_dir, "--max-num-seqs", "2", "--max-queued-requests", "2", "--num-kv-blocks", "128")
    try:
        server.wait_ready()

        async def main():
            async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=300) as client:
                body = {"prompt": "busy server", "max_tokens": 60, "ignore_eos": True, "temperature": 0}
                plain = [client.post("/v1/completions", json=body) for _ in range(9)]
                streams = [stream_completion(client, body) for _ in range(3)]
                return await asyncio.gather(*plain), await asyncio.gather(*streams)

        plain, streams = asyncio.run(main())
        ok = [r for r in plain if r.status_code == 200]
        refused = [r for r in plain if r.status_code == 429]
        assert len(ok) + len(refused) == len(plain), [r.status_code for r in plain]
        assert len(ok) >= 4 and len(refused) >= 3   # 2 running + 2 waiting; the rest refused
        for r in ok:
            assert r.json()["usage"]["completion_tokens"] == 60
        for r in refused:
            assert r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "queue_full" and r.json()["error"]["type"] == "rate_limit_error"
        for s in streams:  # a refused stream is refused before it starts; an admitted one completes
            assert (s["status"] == 429 and s["errors"][0]["error"]["code"] == "queue_full") or \
                (s["status"] == 200 and s["done"] and len(s["token_ids"]) == 60), s
        refused_total = len(refused) + sum(s["status"] == 429 for s in streams)
        assert failures(server, "queue_full") == refused_total
        assert httpx.post(server.url + "/v1/completions", json={"prompt": "after", "max_tokens": 2},
                          headers=server.headers).status_code == 200
        kv = wait_kv_idle(server)
        assert kv["num_free_blocks"] == kv["num_blocks"]
    finally:
        server.stop()


async def _sigterm_during(server, bodies: list[dict]) -> tuple[list[dict], httpx.Response, httpx.Response]:
    """Start streams, SIGTERM the server once every one is generating, then try a late request."""
    async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=120) as client:
        started = [asyncio.Event() for _ in bodies]
        streams = [asyncio.create_task(stream_completion(client, {**body, "ignore_eos": True}, started=event))
                   for body, event in zip(bodies, started)]
        for event in started:
            await event.wait()
        os.kill(server.proc.pid, signal.SIGTERM)
        await asyncio.sleep(0.1)
        late = await client.post("/v1/completions", json={"prompt": "late", "max_tokens": 2})
        health = await client.get("/health")
        return await asyncio.gather(*streams), late, health


def test_sigterm_lets_in_flight_requests_finish_then_exits_0(model_dir):
    server = ServerProcess(model_dir, "--shutdown-timeout", "60", "--num-kv-blocks", "256").wait_ready()
    try:
        children_before = server.children()
        bodies = [{"prompt": f"in flight {i}", "max_tokens": 24 * (i + 1)} for i in range(4)]
        results, late, health = asyncio.run(_sigterm_during(server, bodies))
        assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
        assert health.status_code == 503 and health.json()["status"] == "draining"
        for body, r in zip(bodies, results):  # every request in flight at SIGTERM finished normally
            assert r["done"] and not r["errors"] and r["finish_reason"] == "length", r
            assert len(r["token_ids"]) == body["max_tokens"]
        assert server.proc.wait(30) == 0, server.output()
        assert "drained" in server.output()
        assert not [pid for pid in children_before if os.path.exists(f"/proc/{pid}")]
    finally:
        server.stop()


def test_sigterm_aborts_requests_that_outlive_the_shutdown_timeout(model_dir):
    server = ServerProcess(model_dir, "--shutdown-timeout", "0.3", "--num-kv-blocks", "256").wait_ready()
    try:
        (long,), late, _ = asyncio.run(_sigterm_during(server, [{"prompt": "long", "max_tokens": 480}]))
        assert late.status_code == 503
        # 480 tokens need 480 engine steps, far more than 0.3 s: aborted, told so, then [DONE]
        assert long["done"] and 0 < len(long["token_ids"]) < 480
        assert long["errors"] and long["errors"][0]["error"]["code"] == "aborted", long
        assert server.proc.wait(30) == 0, server.output()
    finally:
        server.stop()


def self_signed_cert(directory) -> tuple[str, str]:
    """A certificate for 127.0.0.1 and its key, as PEM files."""
    import datetime
    import ipaddress

    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def test_tls(model_dir, tmp_path):
    import openai

    cert, key = self_signed_cert(tmp_path)
    server = ServerProcess(model_dir, "--ssl-certfile", cert, "--ssl-keyfile", key, "--num-kv-blocks", "64")
    try:
        server.wait_ready()
        assert server.url.startswith("https://")
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=server.api_key, max_retries=0,
                               http_client=httpx.Client(verify=server.verify))
        got = client.completions.create(model=str(model_dir), prompt="secure", max_tokens=3,
                                        extra_body={"ignore_eos": True})
        assert got.usage.completion_tokens == 3
        with pytest.raises(httpx.HTTPError):  # plain HTTP on the TLS port gets nowhere
            httpx.get(server.url.replace("https", "http") + "/health", timeout=5)
    finally:
        assert server.stop() == 0
