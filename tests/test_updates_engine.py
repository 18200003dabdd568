"""Live weight updates through the Python API (no server): swap, delta, rollback, policies, failures."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
import torch
from test_updates_helpers import PROMPTS, build_registry, wider_checkpoint

from open_autoglm.engine.llm_engine import LLMEngine
from open_autoglm.engine.request import RequestStatus
from open_autoglm.engine.updates import UpdateSource
from open_autoglm.registry import Registry
from open_autoglm.sampling_params import SamplingParams
from open_autoglm.worker import updates as wu
from open_autoglm.worker.updates import UpdateError, UpdateInProgress

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def reg(tiny_checkpoint, tmp_path_factory) -> Registry:
    return build_registry(tmp_path_factory.mktemp("updates"), tiny_checkpoint("llama"))


def make_engine(path, **options) -> LLMEngine:
    return LLMEngine(model=str(path), device="cpu", num_kv_blocks=64, **options)


def run(engine: LLMEngine, prompts=PROMPTS, params=GREEDY) -> list:
    ids = [engine.add_request(p, params) for p in prompts]
    finished = {}
    while len(finished) < len(ids):
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    return [finished[i] for i in ids]


def tokens(outputs) -> list[list[int]]:
    return [o.output_token_ids for o in outputs]


def test_swap_then_rollback_restores_outputs_and_versions(reg):
    engine = make_engine(reg.resolve("tiny", "v1"))
    before = run(engine)
    assert engine.version == "v1" and {o.version for o in before} == {"v1"}
    report = engine.update_weights(UpdateSource(model="tiny", version="v3", registry=str(reg.root)))
    assert (report.status, report.mode, report.to_version, report.staging) == ("done", "full", "v3", "host")
    assert report.bytes_moved == report.model_bytes and report.num_tensors > 0
    swapped = run(engine)
    assert {o.version for o in swapped} == {"v3"}
    assert tokens(swapped) == tokens(run(make_engine(reg.resolve("tiny", "v3"))))
    rolled = engine.rollback()
    assert (rolled.mode, rolled.to_version, engine.version) == ("rollback", "v1", "v1")
    after = run(engine)
    assert tokens(after) == tokens(before) and {o.version for o in after} == {"v1"}
    assert engine.updates.counters.rollbacks == 1


def test_prefix_cache_is_never_shared_across_versions(reg):
    engine = make_engine(reg.resolve("tiny", "v1"))
    long_prompt = [PROMPTS[0] * 3]
    run(engine, long_prompt)
    assert run(engine, long_prompt)[0].num_cached_tokens > 0  # same version: reused
    engine.update_weights(reg.resolve("tiny", "v3"))
    first = run(engine, long_prompt)[0]
    assert first.num_cached_tokens == 0 and first.version == "v3"
    assert run(engine, long_prompt)[0].num_cached_tokens > 0


def test_delta_from_registry_matches_a_fresh_engine_on_the_target(reg):
    engine = make_engine(reg.resolve("tiny", "v1"))
    report = engine.update_weights(UpdateSource(model="tiny", version="v2", registry=str(reg.root)), mode="delta")
    diff = reg.diff("tiny", "v1", "v2")
    assert report.mode == "delta" and report.to_version == "v2"
    assert report.num_tensors == len(diff.changed)
    assert report.bytes_moved == diff.changed_nbytes  # F32 checkpoint, F32 engine: same bytes
    assert report.bytes_moved < report.model_bytes
    assert tokens(run(engine)) == tokens(run(make_engine(reg.resolve("tiny", "v2"))))


def test_delta_file_then_rollback(reg, tmp_path):
    delta = tmp_path / "v1-v2.delta.safetensors"
    reg.make_delta("tiny", "v1", "v2", delta)
    engine = make_engine(reg.resolve("tiny", "v1"))
    before = tokens(run(engine))
    report = engine.update_weights(delta, mode="auto")
    assert (report.mode, report.to_version, engine.updates.identity.manifest_hash) == (
        "delta", "v2", reg.show("tiny", "v2").manifest_hash)
    assert tokens(run(engine)) == tokens(run(make_engine(reg.resolve("tiny", "v2"))))
    engine.rollback()
    assert tokens(run(engine)) == before and engine.updates.identity.manifest_hash == reg.show("tiny", "v1").manifest_hash


def _refused(engine: LLMEngine, stage: str, before: list, **update) -> UpdateError:
    source = update.pop("source")
    with pytest.raises(UpdateError) as info:
        engine.update_weights(source, **update)
    assert info.value.stage == stage, info.value
    assert engine.version == "v1" and tokens(run(engine)) == before
    assert engine.updates.counters.failures.get(stage, 0) >= 1
    return info.value


def test_refusals_leave_the_old_version_serving(reg, tmp_path):
    from conftest import write_tiny_checkpoint

    engine = make_engine(reg.resolve("tiny", "v1"))
    before = tokens(run(engine))
    good = tmp_path / "good.delta"
    reg.make_delta("tiny", "v1", "v2", good)
    corrupt = tmp_path / "corrupt.delta"
    data = bytearray(good.read_bytes())
    data[-100] ^= 0x01  # one flipped bit in the last tensor's bytes
    corrupt.write_bytes(bytes(data))
    err = _refused(engine, "verify", before, source=corrupt, mode="delta")
    assert "hash mismatch" in str(err)
    wrong_base = tmp_path / "v2-v3.delta"
    reg.make_delta("tiny", "v2", "v1", wrong_base)  # made from v2, the engine runs v1
    assert "wrong base" in str(_refused(engine, "base", before, source=wrong_base, mode="delta"))
    _refused(engine, "resolve", before, source=tmp_path / "missing")
    other_arch = write_tiny_checkpoint(tmp_path / "qwen2", "qwen2")
    assert "architecture" in str(_refused(engine, "compat", before, source=other_arch))
    assert "intermediate_size" in str(_refused(engine, "compat", before, source=wider_checkpoint(tmp_path / "wide")))
    assert engine.updates.current is None and not engine.updates.history


def test_corrupt_registry_folder_and_nan_weights_are_refused(reg, tmp_path):
    engine = make_engine(reg.resolve("tiny", "v1"))
    before = tokens(run(engine))
    bad = tmp_path / "bad"
    shutil.copytree(reg.resolve("tiny", "v3"), bad)
    for f in bad.iterdir():
        f.chmod(0o644)
    raw = bytearray((bad / "model.safetensors").read_bytes())
    raw[-8] ^= 0xFF
    (bad / "model.safetensors").write_bytes(bytes(raw))
    _refused(engine, "verify", before, source=bad)
    nan = tmp_path / "nan"
    from safetensors.torch import load_file, save_file

    shutil.copytree(reg.resolve("tiny", "v3"), nan)
    (nan / "manifest.json").unlink()
    (nan / "model.safetensors").chmod(0o644)
    weights = load_file(str(nan / "model.safetensors"))
    weights["model.norm.weight"] = torch.full_like(weights["model.norm.weight"], float("nan"))
    save_file(weights, str(nan / "model.safetensors"), metadata={"format": "pt"})
    _refused(engine, "warmup", before, source=nan)


def test_a_delta_that_breaks_the_model_is_refused_before_serving(reg, tmp_path):
    from safetensors.torch import load_file, save_file

    def broken(name: str, edit) -> Path:
        folder = tmp_path / name
        shutil.copytree(reg.resolve("tiny", "v1"), folder)
        (folder / "manifest.json").unlink()
        (folder / "model.safetensors").chmod(0o644)
        weights = load_file(str(folder / "model.safetensors"))
        edit(weights)
        save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder

    local = Registry(tmp_path / "registry")
    local.publish("tiny", reg.resolve("tiny", "v1"), version="v1")
    local.publish("tiny", broken("inf", lambda w: w["model.layers.1.mlp.down_proj.weight"].__setitem__(
        (0, 0), float("inf"))), version="inf")
    local.publish("tiny", broken("huge", lambda w: w["model.norm.weight"].fill_(3e38)), version="huge")
    engine = make_engine(local.resolve("tiny", "v1"))
    before = tokens(run(engine))
    src = {"mode": "delta", "source": UpdateSource(model="tiny", version="inf", registry=str(local.root))}
    assert "non-finite values" in str(_refused(engine, "warmup", before, **src))  # the changed tensors are checked
    src["source"] = UpdateSource(model="tiny", version="huge", registry=str(local.root))  # finite, but overflows:
    _refused(engine, "warmup", before, **src, warmup_prompts=["The quick brown fox"])  # only prompts tell


def test_not_enough_memory_is_refused_before_anything_is_allocated(reg, monkeypatch):
    engine = make_engine(reg.resolve("tiny", "v1"))
    before = tokens(run(engine))
    monkeypatch.setattr(wu, "host_available_bytes", lambda: 1 << 20)
    err = _refused(engine, "memory", before, source=reg.resolve("tiny", "v3"))
    assert "MiB of host memory" in str(err)

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.undo()
    monkeypatch.setattr(wu, "build_shadow", oom)
    _refused(engine, "memory", before, source=reg.resolve("tiny", "v3"))


def test_failure_mid_copy_puts_the_old_weights_back(reg, monkeypatch):
    engine = make_engine(reg.resolve("tiny", "v1"))
    before = tokens(run(engine))
    calls = {"n": 0}
    real = wu._copy

    def flaky(dst, src):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("injected copy failure")
        real(dst, src)

    monkeypatch.setattr(wu, "_copy", flaky)
    with pytest.raises(UpdateError) as info:
        engine.update_weights(reg.resolve("tiny", "v3"))
    assert info.value.stage == "switch" and "copied back" in str(info.value)
    assert engine.version == "v1" and tokens(run(engine)) == before


def _start_long(engine: LLMEngine, n: int = 2) -> list[str]:
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in PROMPTS[:n]]
    for _ in range(4):
        engine.step()
    return ids


def _drive(engine: LLMEngine) -> dict:
    outs: dict[str, list] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outs.setdefault(out.request_id, []).append(out)
    return outs


def test_drain_finishes_running_requests_on_old_weights(reg):
    v1, v3 = reg.resolve("tiny", "v1"), reg.resolve("tiny", "v3")
    engine = make_engine(v1)
    old_ids = _start_long(engine)
    report = engine.update_weights(v3, "drain")
    assert report.status == "pending" and engine.version == "v1"
    new_id = engine.add_request(PROMPTS[2], GREEDY)
    outs = _drive(engine)
    assert report.status == "done" and report.requests["held"] == 1 and report.requests["recomputed"] == 0
    for rid in old_ids:
        assert {o.version for o in outs[rid]} == {"v1"} and outs[rid][-1].finish_reason == "length"
    ref = run(make_engine(v1), PROMPTS[:2], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    assert [outs[rid][-1].output_token_ids for rid in old_ids] == tokens(ref)
    assert {o.version for o in outs[new_id]} == {"v3"}
    assert outs[new_id][-1].output_token_ids == tokens(run(make_engine(v3), [PROMPTS[2]]))[0]


def test_recompute_continues_running_requests_on_new_weights(reg):
    v1, v3 = reg.resolve("tiny", "v1"), reg.resolve("tiny", "v3")
    engine = make_engine(v1)
    [rid] = _start_long(engine, 1)
    report = engine.update_weights(v3, "recompute")
    assert report.status == "done" and report.requests["recomputed"] == 1
    request = engine.requests[rid]
    prefix = list(request.output_token_ids)  # made by v1 (with overlapped steps, the one in flight too)
    assert request.version == "v3" and request.status == RequestStatus.PREEMPTED and request.num_computed_tokens == 0
    final = _drive(engine)[rid][-1]
    assert final.version == "v3" and final.finish_reason == "length" and final.output_token_ids[:len(prefix)] == prefix
    # the rest is what v3 continues from the prompt plus the tokens v1 made
    rest = SamplingParams(max_tokens=24 - len(prefix), temperature=0, ignore_eos=True)
    assert final.output_token_ids[len(prefix):] == tokens(run(make_engine(v3), [PROMPTS[0] + prefix], rest))[0]


def test_abort_policy_and_drain_timeout(reg):
    v1, v3 = reg.resolve("tiny", "v1"), reg.resolve("tiny", "v3")
    engine = make_engine(v1)
    ids = _start_long(engine)
    report = engine.update_weights(v3, "abort")
    outs = _drive(engine)
    assert report.requests["aborted"] == 2 and all(outs[i][-1].finish_reason == "abort" for i in ids)
    assert {outs[i][-1].error for i in ids} == {"aborted: weights updated to v3"}  # what the server shows
    ids = _start_long(engine)
    report = engine.update_weights(v1, "drain", drain_timeout=0.0)  # stragglers are recomputed, not failed
    outs = _drive(engine)
    assert report.requests["recomputed"] == 2
    assert all(outs[i][-1].finish_reason == "length" and outs[i][-1].version == "v1" for i in ids)


def test_second_update_while_one_runs_is_refused(reg, monkeypatch):
    engine = make_engine(reg.resolve("tiny", "v1"))
    entered, release = threading.Event(), threading.Event()
    real = wu.warmup

    def slow_warmup(*args, **kwargs):
        entered.set()
        release.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(wu, "warmup", slow_warmup)
    first: dict = {}
    thread = threading.Thread(target=lambda: first.update(r=engine.update_weights(reg.resolve("tiny", "v3"))))
    thread.start()
    try:
        assert entered.wait(10)
        with pytest.raises(UpdateInProgress):
            engine.update_weights(reg.resolve("tiny", "v2"))
        with pytest.raises(UpdateInProgress):
            engine.rollback()
        assert engine.updates.status()["in_progress"]["stage"] == "warmup"
    finally:
        release.set()
        thread.join(10)
    assert first["r"].status == "done" and engine.version == "v3"


def _rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


def test_twenty_swap_rollback_cycles_do_not_leak(reg):
    engine = make_engine(reg.resolve("tiny", "v1"))
    before = tokens(run(engine))
    free, held = engine.block_manager.num_free_blocks, engine.updates.held_bytes()
    rss = None
    for i in range(20):
        run(engine, PROMPTS[:1])
        engine.update_weights(reg.resolve("tiny", "v3" if i % 2 else "v2"), mode="full" if i % 2 else "delta")
        run(engine, PROMPTS[:1])
        engine.rollback()
        if i == 4:
            rss = _rss()
        assert engine.block_manager.num_free_blocks == free and engine.updates.held_bytes() == held
        assert not engine.updates.history and not engine.requests
    assert tokens(run(engine)) == before
    assert _rss() - rss < 32 << 20


def test_lazy_loads_on_first_request(reg):
    engine = make_engine(reg.resolve("tiny", "v1"), load_strategy="lazy")
    assert engine.updates.lazy_source is not None and engine.updates.status()["weights_loaded"] is False
    outs = run(engine)
    assert engine.updates.lazy_source is None and engine.updates.lazy_load_seconds is not None
    assert tokens(outs) == tokens(run(make_engine(reg.resolve("tiny", "v1"))))


def test_resident_versions_switch_without_loading(reg):
    engine = make_engine(reg.resolve("tiny", "v1"), load_strategy="resident")
    before = tokens(run(engine))
    src = UpdateSource(model="tiny", version="v3", registry=str(reg.root))
    assert engine.updates.preload(src).status == "done"
    report = engine.update_weights(src)
    assert report.staging == "resident" and "warmup" not in report.seconds
    v3_tokens = tokens(run(engine))
    back = engine.update_weights(UpdateSource(model="tiny", version="v1", registry=str(reg.root)))
    assert back.staging == "resident" and tokens(run(engine)) == before
    again = engine.update_weights(src)
    assert again.staging == "resident" and tokens(run(engine)) == v3_tokens
    assert {r["version"] for r in engine.updates.status()["resident"]} == {"v1", "v3"}


def test_a_swap_keeps_the_live_tokenizer_when_its_files_are_unchanged(reg, tmp_path):
    """Loading a tokenizer holds the GIL for a while (the engine thread would stall): a full swap
    reuses the live one when every tokenizer file is byte-identical, and loads its own otherwise."""
    engine = make_engine(reg.resolve("tiny", "v1"))
    live_tokenizer = engine.tokenizer
    engine.update_weights(UpdateSource(model="tiny", version="v3", registry=str(reg.root)))
    assert engine.tokenizer is live_tokenizer
    changed = tmp_path / "v3-new-template"
    shutil.copytree(reg.resolve("tiny", "v3"), changed)
    (changed / "manifest.json").unlink()
    config = changed / "tokenizer_config.json"
    config.write_text(config.read_text().replace("{", '{"padding_side": "left", ', 1))
    engine.update_weights(str(changed))
    assert engine.tokenizer is not live_tokenizer and str(engine.tokenizer.name_or_path).endswith("v3-new-template")
    assert tokens(run(engine)) == tokens(run(make_engine(reg.resolve("tiny", "v3"))))
