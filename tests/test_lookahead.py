"""Overlapped decode steps (engine/lookahead.py) against the synchronous engine.

The overlapped engine launches step N+1 before reading step N's tokens; everything a caller sees
must be what the synchronous engine gives: tokens, texts, finish reasons, stop reasons, and every
KV block returned at the end. CPU: "on" forces the overlapped bookkeeping (on CUDA it is the default).
"""

from __future__ import annotations

import random

import pytest

from open_autoglm.engine.llm_engine import LLMEngine
from open_autoglm.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def engines(tiny_checkpoint):
    path = str(tiny_checkpoint("qwen2"))
    return {mode: LLMEngine(model=path, device="cpu", async_scheduling=mode, max_num_seqs=8) for mode in ("off", "on")}


class Launches:
    """Counts steps launched ahead (runner.execute with device input ids)."""

    def __init__(self, engine: LLMEngine, monkeypatch) -> None:
        self.n = 0
        execute = engine.runner.execute

        def counting(batch, input_ids=None):
            self.n += input_ids is not None
            return execute(batch, input_ids)

        monkeypatch.setattr(engine.runner, "execute", counting)


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 250) for _ in range(rng.randrange(3, 20))] for _ in range(n)]


def run(engine: LLMEngine, todo: list[tuple[list[int], SamplingParams]], abort_at: dict[int, int] | None = None,
        add_at: dict[int, tuple[list[int], SamplingParams]] | None = None):
    """Step until done; returns {request id: (final output, concatenated new_token_ids, new_text)}.
    abort_at {step: request index}: abort that request before that step; add_at adds one."""
    ids = [engine.add_request(p, sp) for p, sp in todo]
    seen: dict[str, list] = {}
    step = 0
    while engine.has_unfinished_requests():
        if abort_at and step in abort_at:
            out = engine.abort_request(ids[abort_at[step]])
            if out is not None:
                seen.setdefault(out.request_id, []).append(out)
        if add_at and step in add_at:
            ids.append(engine.add_request(*add_at[step]))
        for out in engine.step():
            seen.setdefault(out.request_id, []).append(out)
        step += 1
        assert step < 500
    result = {}
    for rid in ids:
        outs = seen[rid]
        assert outs[-1].finished and sum(o.finished for o in outs) == 1
        result[rid] = (outs[-1].output_token_ids, outs[-1].finish_reason, outs[-1].stop_reason,
                       [t for o in outs for t in o.new_token_ids], "".join(o.new_text for o in outs), outs[-1].text)
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks, "every KV block comes back"
    return [result[rid] for rid in ids]


def same_results(engines, todo, **kwargs):
    off, on = run(engines["off"], todo, **kwargs), run(engines["on"], todo, **kwargs)
    assert on == off
    for tokens, _, _, deltas, text_deltas, text in on:
        assert deltas == tokens and text_deltas == text
    return on


def test_greedy_batch_with_different_lengths(engines, monkeypatch):
    launches = Launches(engines["on"], monkeypatch)
    todo = [(p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
            for p, n in zip(prompts(6), [1, 2, 5, 17, 17, 30])]
    results = same_results(engines, todo)
    assert [len(r[0]) for r in results] == [1, 2, 5, 17, 17, 30]
    assert launches.n > 15  # most decode steps of the long requests were launched ahead


def test_stops_found_only_when_processed(engines, monkeypatch):
    """EOS-like stop tokens and stop strings end a request one step after its next step was
    launched: that row's token is dropped, its blocks still come back."""
    greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    reference = run(engines["off"], [(p, greedy) for p in prompts(4, seed=1)])
    todo = []
    for p, (tokens, *_rest, text) in zip(prompts(4, seed=1), reference):
        todo.append((p, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop_token_ids=[tokens[6]])))
        if len(text) > 8:
            todo.append((p, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=[text[5:8]])))
    launches = Launches(engines["on"], monkeypatch)
    results = same_results(engines, todo)
    assert any(r[1] == "stop" and len(r[0]) < 24 for r in results)
    assert launches.n > 0


@pytest.mark.parametrize("params", [
    dict(temperature=0.8, top_p=0.9, seed=7),            # seeded sampling: same draws in the same order
    dict(temperature=0, repetition_penalty=1.3),          # penalties read tokens on the host: never ahead
    dict(temperature=0, logprobs=2),                      # logprobs: never ahead
])
def test_sampling_settings(engines, params, monkeypatch):
    launches = Launches(engines["on"], monkeypatch)
    todo = [(p, SamplingParams(max_tokens=12, ignore_eos=True, **params)) for p in prompts(3, seed=2)]
    if "seed" in params:
        # one seed per request, so draws do not depend on which request shares the batch
        todo = [(p, SamplingParams(max_tokens=12, ignore_eos=True, **{**params, "seed": i})) for i, (p, _) in enumerate(todo)]
    same_results(engines, todo)
    assert (launches.n > 0) == ("seed" in params)


def test_abort_and_arrival_while_a_step_is_in_flight(engines):
    """An abort drops the step in flight for that request (its outputs lag one step, so it has
    one token fewer than the synchronous engine aborted at the same call); nothing else changes."""
    greedy = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    todo = [(p, greedy) for p in prompts(3, seed=3)]
    events = dict(abort_at={6: 1}, add_at={9: (prompts(1, seed=4)[0], greedy)})
    off, on = run(engines["off"], todo, **events), run(engines["on"], todo, **events)
    assert on[1][1] == off[1][1] == "abort"
    assert on[1][0] == off[1][0][:len(on[1][0])] and len(off[1][0]) - len(on[1][0]) <= 1
    assert on[1][3] == on[1][0]  # what was streamed is what it ends with
    assert [on[i] for i in (0, 2, 3)] == [off[i] for i in (0, 2, 3)]
    assert len(on[3][0]) == 20  # the late arrival ran to the end


def test_default_is_off_on_cpu(tiny_checkpoint):
    engine = LLMEngine(model=str(tiny_checkpoint("qwen2")), device="cpu")
    assert engine.config.async_scheduling == "auto" and not engine.overlap


def test_out_of_blocks_falls_back_to_the_scheduler(tiny_checkpoint, monkeypatch):
    """A cache too small for every request: a continuation that cannot get its next block is not
    launched; the scheduler preempts as usual and every request still ends with its tokens."""
    path = str(tiny_checkpoint("qwen2"))
    small = {mode: LLMEngine(model=path, device="cpu", async_scheduling=mode, max_num_seqs=8, num_kv_blocks=10)
             for mode in ("off", "on")}
    greedy = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    todo = [(p, greedy) for p in prompts(4, seed=5)]
    launches = Launches(small["on"], monkeypatch)
    results = same_results(small, todo)
    assert all(len(r[0]) == 40 for r in results)
    assert small["on"].scheduler.num_preemptions > 0 and launches.n > 0


def test_final_only_requests(engines):
    """LLM.generate's requests (one output each, text decoded once at the end) overlap too."""
    todo = [(p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)) for p, n in zip(prompts(3, seed=6), [4, 11, 19])]
    finals = {}
    for mode, engine in engines.items():
        ids = [engine.add_request(p, sp, final_only=True) for p, sp in todo]
        outs = []
        while engine.has_unfinished_requests():
            outs += engine.step()
        assert all(o.finished for o in outs) and sorted(o.request_id for o in outs) == sorted(ids)
        by_id = {o.request_id: o for o in outs}
        finals[mode] = [(by_id[i].output_token_ids, by_id[i].text, by_id[i].new_token_ids) for i in ids]
    assert finals["on"] == finals["off"]
    assert [len(t) for t, _, _ in finals["on"]] == [4, 11, 19]
