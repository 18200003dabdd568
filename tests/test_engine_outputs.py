"""The engine's per-step host path: outputs, final_only requests, stop checks, batch finishing."""

from __future__ import annotations

import dataclasses
import random

import pytest

from open_autoglm.engine.block_manager import BlockManager
from open_autoglm.engine.detokenizer import FastDecoder, IncrementalDetokenizer
from open_autoglm.engine.llm_engine import LLMEngine
from open_autoglm.engine.request import Request, RequestOutput, RequestStatus
from open_autoglm.engine.scheduler import Scheduler
from open_autoglm.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    return LLMEngine(model=str(tiny_checkpoint("qwen2")), device="cpu")


def run(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams], final_only: bool = False):
    """All requests at once until done; every output of every step, by request id."""
    ids = [engine.add_request(p, sp, final_only=final_only) for p, sp in zip(prompts, params)]
    seen: dict[str, list[RequestOutput]] = {rid: [] for rid in ids}
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen[out.request_id].append(out)
    return [seen[rid] for rid in ids]


def test_output_of_fills_every_field_by_name():
    """RequestOutput.of is positional for speed: each field must still get its own value."""
    req = Request("r1", [1, 2], SamplingParams(), eos_token_ids=(9,), version="v7", arrival_time=1.5,
                  output_token_ids=[4, 5], output_logprobs=[{"a": 1}], num_cached_tokens=16,
                  stop_reason="zz", error="boom", first_scheduled_time=2.5, first_token_time=3.5,
                  status=RequestStatus.FINISHED_STOPPED)
    out = RequestOutput.of(req, [5], "new", "all text", [{"b": 2}])
    expected = RequestOutput(
        request_id="r1", new_token_ids=[5], new_text="new", text="all text", output_token_ids=[4, 5],
        prompt_token_ids=[1, 2], finished=True, finish_reason="stop", stop_reason="zz", new_logprobs=[{"b": 2}],
        output_logprobs=[{"a": 1}], num_cached_tokens=16, version="v7", error="boom", arrival_time=1.5,
        first_scheduled_time=2.5, first_token_time=3.5)
    assert dataclasses.astuple(out) == dataclasses.astuple(expected)
    req.status = RequestStatus.RUNNING
    out = RequestOutput.of(req, [5], "", "", [])
    assert not out.finished and out.finish_reason is None


def test_final_only_matches_the_last_streamed_output(engine):
    rng = random.Random(0)
    prompts = [[rng.randrange(10, 300) for _ in range(rng.randrange(3, 40))] for _ in range(6)]
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, logprobs=lp)
              for n, lp in zip([1, 5, 9, 16, 3, 12], [None, 2, None, 0, None, 1])]
    params[2].stop = ["e"]  # a stop string: detokenized step by step even in final_only
    streamed = run(engine, prompts, params)
    final = run(engine, prompts, params, final_only=True)
    for steps, (only,) in zip(streamed, final):
        last = steps[-1]
        assert only.finished and only.text == last.text == "".join(o.new_text for o in steps)
        assert only.output_token_ids == last.output_token_ids == only.new_token_ids
        assert only.new_text == only.text and only.new_logprobs == only.output_logprobs == last.output_logprobs
        assert (only.finish_reason, only.stop_reason) == (last.finish_reason, last.stop_reason)
    assert not engine.requests and not engine.detokenizers and not engine.scheduler.running


def test_whole_batch_finishing_in_one_step_frees_everything(engine):
    free = engine.block_manager.num_free_blocks
    outs = run(engine, [[11, 12, 13]] * 5 + [[14, 15]], [SamplingParams(max_tokens=4, temperature=0,
                                                                          ignore_eos=True)] * 6)
    assert all(len(o) == 4 and o[-1].finish_reason == "length" for o in outs)
    assert all(not o.finished for steps in outs for o in steps[:-1])
    assert engine.block_manager.num_free_blocks == free and not engine.scheduler.running


def test_stop_checks_keep_their_precedence(engine):
    """EOS, stop token, length and stop string on one token: the documented order decides."""
    [steps] = run(engine, [[20, 21, 22]], [SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)])
    first = steps[0].output_token_ids[0]
    eos = engine.eos_token_ids
    try:
        engine.eos_token_ids = (first,)
        cases = [  # (params, finish_reason, stop_reason)
            (dict(stop_token_ids=[first]), "stop", None),                    # EOS before stop token
            (dict(stop_token_ids=[first], ignore_eos=True), "stop", first),  # stop token before length
            (dict(ignore_eos=True, max_tokens=1), "length", None),
        ]
        for options, reason, stop_reason in cases:
            options = {"max_tokens": 4, "temperature": 0, **options}
            [steps] = run(engine, [[20, 21, 22]], [SamplingParams(**options)])
            assert len(steps) == 1 and (steps[0].finish_reason, steps[0].stop_reason) == (reason, stop_reason)
    finally:
        engine.eos_token_ids = eos


def test_max_model_len_caps_the_output(tiny_checkpoint):
    small = LLMEngine(model=str(tiny_checkpoint("qwen2")), device="cpu", max_model_len=12)
    [steps] = run(small, [[5] * 8], [SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)])
    assert len(steps[-1].output_token_ids) == 4 and steps[-1].finish_reason == "length"


def test_single_token_memo_gives_the_same_text(tiny_checkpoint):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_checkpoint("qwen2"))
    fast = FastDecoder(tok)
    rng = random.Random(1)
    for skip in (True, False):
        for _ in range(20):
            ids = [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 30))]
            params = SamplingParams(skip_special_tokens=skip)
            plain, memo = IncrementalDetokenizer(tok, [], params), IncrementalDetokenizer(fast, [], params)
            assert [plain.append(t) for t in ids] == [memo.append(t) for t in ids]
            assert plain.finish() == memo.finish() and plain.output_text == memo.output_text
    assert fast.single[0] and fast.single[1]  # both memos were used


def test_deferred_detokenizer_decodes_once_at_the_end(tiny_checkpoint):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_checkpoint("qwen2"))
    ids = tok.encode("Ünïcödé and emoji 🚀 text", add_special_tokens=False)
    detok = IncrementalDetokenizer(FastDecoder(tok), [], SamplingParams(), final_only=True)
    assert detok.deferred and all(detok.append(t) == ("", None) for t in ids)
    assert detok.finish() == detok.output_text == tok.decode(ids, skip_special_tokens=True)
    with_stop = IncrementalDetokenizer(FastDecoder(tok), [], SamplingParams(stop=["emoji"]), final_only=True)
    assert not with_stop.deferred  # stop strings are matched as tokens arrive


def test_finish_many_frees_in_order_and_keeps_the_queues():
    bm = BlockManager(16, 4, enable_prefix_caching=False)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    reqs = [Request(str(i), list(range(10 * i, 10 * i + 5)), SamplingParams(), version="v") for i in range(4)]
    for r in reqs:
        sched.add(r)
    sched.update(sched.schedule())
    late = Request("w", [1, 2, 3], SamplingParams(), version="v")
    sched.add(late)
    running = sched.running
    blocks = [list(reqs[2].block_ids), list(reqs[0].block_ids)]
    for r in (reqs[2], reqs[0], late):
        r.status = RequestStatus.FINISHED_ABORTED
    sched.finish_many([reqs[2], reqs[0], late])
    assert sched.running is running and sched.running == [reqs[1], reqs[3]] and not sched.waiting
    # blocks return tail-first per request, requests in the order given
    assert list(bm.free_queue)[-4:] == blocks[0][::-1] + blocks[1][::-1]
