"""Live updates of a real server process on 127.0.0.1 (tiny model): /admin routes, CLI, metrics."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest
from test_server_harness import API_KEY, MAIN_ARGS, ServerProcess
from test_updates_helpers import PROMPTS, build_registry, stream, wider_checkpoint

pytestmark = pytest.mark.slow
GREEDY = {"max_tokens": 12, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def reg(tiny_checkpoint, tmp_path_factory):
    return build_registry(tmp_path_factory.mktemp("updates-server"), tiny_checkpoint("llama"))


@pytest.fixture(scope="module")
def server(reg):
    proc = ServerProcess(reg.resolve("tiny", "v1"), *MAIN_ARGS).wait_ready()
    yield proc
    proc.stop()


@pytest.fixture(autouse=True)
def serving_v1(request, reg):
    """Every test starts and ends on v1 (the server is shared by the module)."""
    yield
    if "server" in request.fixturenames:
        server = request.getfixturevalue("server")
        r = admin(server, "POST", "/admin/update", source(reg, "v1") | {"warmup_prompts": []})
        assert r.status_code == 200, r.text


def admin(server, method: str, route: str, body: dict | None = None, key: str | None = API_KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, server.url + route, json=body, headers=headers, timeout=120)


def source(reg, version: str) -> dict:
    return {"model": "tiny", "version": version, "registry": str(reg.root)}


def complete(server, prompts=PROMPTS) -> tuple[list[list[int]], set[str]]:
    r = httpx.post(server.url + "/v1/completions", headers=server.headers, timeout=60,
                   json={"prompt": prompts, **GREEDY, "return_token_ids": True})
    assert r.status_code == 200, r.text
    body = r.json()
    return [c["token_ids"] for c in body["choices"]], {body["system_fingerprint"]}


def client(server) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=120,
                             limits=httpx.Limits(max_connections=None, max_keepalive_connections=None))


async def _under_load(server, update_body: dict, num_before: int, num_during: int, route="/admin/update"):
    """num_before streams, the update once they produce tokens, num_during more streams and /health
    polls while it runs. Returns (stream results, update response, health codes)."""
    async with client(server) as c:
        started = asyncio.Event()
        bodies = [{"prompt": PROMPTS[i % 3], **GREEDY, "max_tokens": 24} for i in range(num_before + num_during)]
        tasks = [asyncio.create_task(stream(c, b, started)) for b in bodies[:num_before]]
        await asyncio.wait_for(started.wait(), 60)
        update = asyncio.create_task(c.post(route, json=update_body, headers={"Authorization": f"Bearer {API_KEY}"}))
        health: list[int] = []
        for b in bodies[num_before:]:
            tasks.append(asyncio.create_task(stream(c, b)))
            health.append((await c.get("/health")).status_code)
            await asyncio.sleep(0.002)
        while not update.done():
            health.append((await c.get("/health")).status_code)
            await asyncio.sleep(0.01)
        return await asyncio.gather(*tasks), await update, health


def test_swap_under_100_streams_drain(server, reg):
    ref = {"v1": complete(server)[0]}
    r = admin(server, "POST", "/admin/update", source(reg, "v3"))
    ref["v3"] = complete(server)[0]
    admin(server, "POST", "/admin/rollback")
    results, update, health = asyncio.run(_under_load(server, source(reg, "v3") | {"policy": "drain"}, 50, 50))
    assert update.status_code == 200, update.text
    report = update.json()
    assert (report["status"], report["from_version"], report["to_version"]) == ("done", "v1", "v3")
    assert report["requests"]["held"] >= 1 and report["requests"]["recomputed"] == 0
    assert set(health) == {200}
    for i, res in enumerate(results):
        assert res["status"] == 200 and res["done"] and not res["errors"], res
        assert res["finish_reason"] == "length" and len(res["token_ids"]) == 24
        versions = set(res["versions"])
        assert len(versions) == 1 and versions <= {"v1", "v3"}, versions  # drain: one version per response
        [version] = versions
        assert res["token_ids"][:12] == ref[version][i % 3], (i, version)  # really computed on that version
    assert {v for res in results for v in res["versions"]} == {"v1", "v3"}
    assert sum(res["versions"][0] == "v1" for res in results[:50]) >= 25  # most were running before it
    assert complete(server)[1] == {"v3"}
    assert r.status_code == 200


def test_swap_under_load_recompute(server, reg):
    results, update, health = asyncio.run(_under_load(server, source(reg, "v3") | {"policy": "recompute"}, 30, 10))
    assert update.status_code == 200 and set(health) == {200}
    report = update.json()
    assert report["requests"]["recomputed"] >= 1
    for res in results:
        assert res["done"] and not res["errors"] and len(res["token_ids"]) == 24
        first_new = res["versions"].index("v3")  # recompute: every response ends on the new weights
        assert set(res["versions"][first_new:]) == {"v3"} and set(res["versions"][:first_new]) <= {"v1"}


def test_abort_policy_tells_each_aborted_stream_why(server, reg):
    results, update, health = asyncio.run(_under_load(server, source(reg, "v3") | {"policy": "abort"}, 30, 0))
    assert update.status_code == 200 and set(health) == {200}
    aborted = update.json()["requests"]["aborted"]
    failed = [res for res in results if res["errors"]]
    assert aborted >= 1 and len(failed) == aborted
    for res in failed:
        [error] = [e["error"] for e in res["errors"]]
        assert (error["code"], error["message"]) == ("aborted", "aborted: weights updated to v3") and res["done"]


def test_update_then_rollback_gives_identical_greedy_outputs(server, reg):
    before, fp = complete(server)
    assert fp == {"v1"}
    r = admin(server, "POST", "/admin/update", source(reg, "v3") | {"policy": "recompute"})
    assert r.status_code == 200 and r.json()["staging"] == "host"
    swapped, fp = complete(server)
    assert fp == {"v3"} and swapped != before
    r = admin(server, "POST", "/admin/rollback", {"policy": "drain"})
    assert r.status_code == 200 and r.json()["to_version"] == "v1"
    assert complete(server) == (before, {"v1"})


def test_live_delta_equals_a_server_started_on_the_target(server, reg, tmp_path):
    fresh = ServerProcess(reg.resolve("tiny", "v2"), *MAIN_ARGS).wait_ready()
    try:
        want = complete(fresh)
    finally:
        fresh.stop()
    r = admin(server, "POST", "/admin/delta", source(reg, "v2"))
    assert r.status_code == 200, r.text
    diff = reg.diff("tiny", "v1", "v2")
    assert (r.json()["mode"], r.json()["num_tensors"], r.json()["bytes_moved"]) == ("delta", len(diff.changed),
                                                                                     diff.changed_nbytes)
    assert complete(server) == want
    admin(server, "POST", "/admin/rollback")
    package = tmp_path / "v1-v2.delta.safetensors"
    reg.make_delta("tiny", "v1", "v2", package)
    r = admin(server, "POST", "/admin/update", {"path": str(package), "mode": "auto"})
    assert r.status_code == 200 and r.json()["mode"] == "delta"
    assert complete(server) == want


def test_bad_updates_are_refused_and_v1_keeps_serving(server, reg, tmp_path):
    before = complete(server)
    good = tmp_path / "good.delta"
    reg.make_delta("tiny", "v1", "v2", good)
    corrupt = tmp_path / "corrupt.delta"
    data = bytearray(good.read_bytes())
    data[-100] ^= 0x01
    corrupt.write_bytes(bytes(data))
    wrong_base = tmp_path / "wrong-base.delta"
    reg.make_delta("tiny", "v2", "v1", wrong_base)
    cases = [({"path": str(corrupt), "mode": "delta"}, "verify"), ({"path": str(wrong_base), "mode": "delta"}, "base"),
             ({"path": str(tmp_path / "missing")}, "resolve"),
             ({"path": str(wider_checkpoint(tmp_path / "wide"))}, "compat"),
             (source(reg, "v9"), "resolve")]
    for body, stage in cases:
        r = admin(server, "POST", "/admin/update", body)
        assert r.status_code == 400 and r.json()["stage"] == stage, (stage, r.text)
        assert r.json()["serving_version"] == "v1" and r.json()["error"]["code"] == "update_failed"
        assert httpx.get(server.url + "/health").json()["version"] == "v1"
        assert complete(server) == before
    assert admin(server, "POST", "/admin/update", {"path": "x", "model": "tiny"}).status_code == 400
    assert admin(server, "POST", "/admin/update", {"path": "x", "policy": "later"}).status_code == 400


def test_second_update_gets_409_while_one_drains(server, reg):
    async def main():
        async with client(server) as c:
            started = asyncio.Event()
            long = asyncio.create_task(stream(c, {"prompt": PROMPTS[0], "max_tokens": 400, "temperature": 0,
                                                  "ignore_eos": True}, started))
            await asyncio.wait_for(started.wait(), 60)
            key = {"Authorization": f"Bearer {API_KEY}"}
            first = asyncio.create_task(c.post("/admin/update", json=source(reg, "v3"), headers=key))
            for _ in range(600):  # until the first update is waiting for the long request
                status = (await c.get("/admin/status", headers=key)).json()
                if status["pending_switch"] is not None:
                    break
                await asyncio.sleep(0.02)
            assert status["in_progress"]["stage"] == "drain"
            second = await c.post("/admin/update", json=source(reg, "v2"), headers=key)
            rollback = await c.post("/admin/rollback", headers=key)
            return await long, await first, second, rollback

    long, first, second, rollback = asyncio.run(main())
    assert second.status_code == 409 and second.json()["error"]["code"] == "update_in_progress"
    assert rollback.status_code == 409
    assert first.status_code == 200 and first.json()["to_version"] == "v3"
    assert long["done"] and set(long["versions"]) == {"v1"} and len(long["token_ids"]) == 400


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def test_kv_pool_and_memory_return_to_baseline_after_20_cycles(server, reg):
    def state():
        kv = httpx.get(server.url + "/v1/debug/kv", headers=server.headers).json()
        return kv["num_free_blocks"], admin(server, "GET", "/admin/status").json()["held_bytes"]

    def cycle(i: int) -> None:
        body = source(reg, "v3" if i % 2 else "v2") | {"warmup_prompts": [], "mode": "full" if i % 2 else "delta"}
        assert admin(server, "POST", "/admin/update", body).status_code == 200
        complete(server, PROMPTS[:1])
        assert admin(server, "POST", "/admin/rollback").status_code == 200
        complete(server, PROMPTS[:1])

    for i in range(3):
        cycle(i)
    baseline, rss = state(), _rss(server.proc.pid)
    for i in range(20):
        cycle(i)
    time.sleep(0.2)
    assert state() == baseline
    assert _rss(server.proc.pid) - rss < 48 << 20


def test_admin_needs_the_key(server):
    assert admin(server, "GET", "/admin/status", key=None).status_code == 401
    assert admin(server, "POST", "/admin/rollback", key="wrong").status_code == 401
    assert admin(server, "GET", "/admin/status").status_code == 200


def test_admin_refuses_a_server_without_a_key():
    """One rule for every peer (loopback included) and every /admin route, known or not."""
    from fastapi.testclient import TestClient

    from open_autoglm.server.app import ServerSettings, create_app

    app = create_app()  # no lifespan: no engine is even built
    for peer in (("127.0.0.1", 5000), ("::1", 5000), ("203.0.113.9", 5000)):
        api = TestClient(app, client=peer)
        for method, route in (("POST", "/admin/update"), ("GET", "/admin/status"), ("GET", "/admin/nope"),
                              ("GET", "/admin")):
            r = api.request(method, route, json={"path": "/x"} if method == "POST" else None,
                            headers={"Authorization": "Bearer anything"})
            assert r.status_code == 401, (peer, route, r.status_code)
            assert r.headers["www-authenticate"] == "Bearer"
            error = r.json()["error"]
            assert (error["type"], error["code"]) == ("authentication_error", "admin_key_required")
            assert "start the server with --api-key" in error["message"]
    assert TestClient(app).get("/administrator").status_code == 404  # only /admin and /admin/... are admin
    keyed = TestClient(create_app(settings=ServerSettings(api_key="k")), client=("127.0.0.1", 5000))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "k"}):
        r = keyed.get("/admin/status", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_admin_router_without_the_gate_applies_the_same_rule():
    from types import SimpleNamespace

    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from open_autoglm.server import admin
    from open_autoglm.server.errors import install_error_handlers

    bare = FastAPI()
    install_error_handlers(bare)
    bare.include_router(admin.router)
    bare.state.server = SimpleNamespace(settings=SimpleNamespace(api_key=None), metrics=SimpleNamespace(
        fail=lambda *a, **k: None), version="v")
    r = TestClient(bare, client=("127.0.0.1", 5000)).get("/admin/status")
    assert r.status_code == 401 and r.json()["error"]["code"] == "admin_key_required"
    bare.state.server.settings.api_key = "k"
    r = TestClient(bare).get("/admin/status", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_metrics_and_cli(server, reg, capsys):
    from prometheus_client.parser import text_string_to_metric_families

    from open_autoglm.cli import main

    base = ["--url", server.url, "--api-key", API_KEY]
    assert main(["update", "swap", "--model", "tiny", "--version", "v3", "--registry", str(reg.root), *base]) == 0
    assert "v1 -> v3" in capsys.readouterr().out
    assert main(["update", "status", *base]) == 0
    assert "version v3" in capsys.readouterr().out
    assert main(["update", "delta", "/no/such.delta", *base]) == 1
    assert main(["update", "rollback", "--policy", "recompute", *base]) == 0
    assert main(["update", "status", "--url", server.url, "--api-key", "wrong"]) == 1
    samples = {}
    for family in text_string_to_metric_families(httpx.get(server.url + "/metrics").text):
        for s in family.samples:
            samples.setdefault(s.name, []).append(s)
    [info] = samples["autoglm_model_version_info"]
    assert info.labels["version"] == "v1" and info.labels["hash"] == reg.show("tiny", "v1").manifest_hash
    count = {s.labels["mode"]: s.value for s in samples["autoglm_weight_update_duration_seconds_count"]}
    assert count["full"] >= 1 and count["rollback"] >= 1
    assert sum(s.value for s in samples["autoglm_weight_update_bytes_total"]) > 0
    failed = {s.labels["stage"]: s.value for s in samples["autoglm_weight_update_failures_total"]}
    assert failed["resolve"] >= 1
    assert samples["autoglm_rollbacks_total"][0].value >= 1
    assert {s.labels["version"] for s in samples["autoglm_time_to_first_token_seconds_count"]} >= {"v1"}


def test_lazy_server_loads_on_first_request(reg):
    lazy = ServerProcess(reg.resolve("tiny", "v1"), *MAIN_ARGS, "--load-strategy", "lazy").wait_ready()
    try:
        assert admin(lazy, "GET", "/admin/status").json()["weights_loaded"] is False
        tokens, fp = complete(lazy)
        assert fp == {"v1"} and all(len(t) == 12 for t in tokens)
        assert admin(lazy, "GET", "/admin/status").json()["weights_loaded"] is True
    finally:
        lazy.stop()
