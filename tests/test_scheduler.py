"""Scheduler with a fake runner: budgets, chunking, preemption order, finish reasons."""

from __future__ import annotations

from open_autoglm.engine.block_manager import BlockManager
from open_autoglm.engine.request import Request, RequestStatus
from open_autoglm.engine.scheduler import Scheduler
from open_autoglm.sampling_params import SamplingParams


def make(rid: str, prompt_len: int, max_tokens: int = 4, start: int = 0) -> Request:
    return Request(rid, list(range(start, start + prompt_len)), SamplingParams(max_tokens=max_tokens), version="v")


def fake_step(sched: Scheduler, token: int = 7):
    """Schedule, 'run' (no model), append one token to each request that reached its end."""
    out = sched.schedule()
    sched.update(out)
    finished = []
    for req, _ in out.scheduled:
        if req.num_computed_tokens == req.num_tokens:
            req.output_token_ids.append(token)
            if req.num_output_tokens >= req.sampling_params.max_tokens:
                sched.finish(req, RequestStatus.FINISHED_LENGTH)
                finished.append(req)
    return out, finished


def test_token_budget_chunks_long_prompts():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=10)
    a, b = make("a", 25), make("b", 6, start=100)
    sched.add(a)
    sched.add(b)
    out, _ = fake_step(sched)
    assert [(r.request_id, n) for r, n in out.scheduled] == [("a", 10)]
    out, _ = fake_step(sched)
    assert [(r.request_id, n) for r, n in out.scheduled] == [("a", 10)]
    out, _ = fake_step(sched)  # a's last 5 tokens, then b's first 5 fill the budget
    assert [(r.request_id, n) for r, n in out.scheduled] == [("a", 5), ("b", 5)]
    assert a.num_output_tokens == 1 and b.num_output_tokens == 0
    out, _ = fake_step(sched)  # a decodes 1, b finishes its prompt
    assert [(r.request_id, n) for r, n in out.scheduled] == [("a", 1), ("b", 1)]


def test_max_num_seqs_limits_the_batch():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=2, max_num_batched_tokens=100)
    for i in range(3):
        sched.add(make(str(i), 4, start=10 * i))
    out, _ = fake_step(sched)
    assert [r.request_id for r, _ in out.scheduled] == ["0", "1"]
    assert [r.request_id for r in sched.waiting] == ["2"]


def test_preempts_latest_arrival_and_recomputes_it_first():
    # 6 blocks of 4 tokens; each request needs 2 blocks for its prompt, more as it decodes.
    sched = Scheduler(BlockManager(6, 4, enable_prefix_caching=False), max_num_seqs=8, max_num_batched_tokens=100)
    reqs = [make(str(i), 8, max_tokens=6, start=10 * i) for i in range(3)]
    for r in reqs:
        sched.add(r)
    fake_step(sched)  # all three prefilled: 6 blocks used, each has 1 output token (9 tokens)
    out, _ = fake_step(sched)  # each needs a 3rd block: the newest (2) is preempted
    assert [r.request_id for r in out.preempted] == ["2"]
    assert reqs[2].status == RequestStatus.PREEMPTED and reqs[2].num_computed_tokens == 0
    assert sched.waiting[0] is reqs[2]
    assert [r.request_id for r, _ in out.scheduled] == ["0", "1"]
    done = []
    for _ in range(30):
        if not sched.has_unfinished():
            break
        done += [r.request_id for r in fake_step(sched)[1]]
    assert sorted(done) == ["0", "1", "2"]
    assert all(r.status == RequestStatus.FINISHED_LENGTH and r.num_output_tokens == 6 for r in reqs)
    assert sched.block_manager.num_free_blocks == 6


def test_prefix_hit_skips_cached_tokens():
    sched = Scheduler(BlockManager(16, 4), max_num_seqs=8, max_num_batched_tokens=100)
    a = make("a", 10)
    sched.add(a)
    fake_step(sched)
    b = Request("b", list(range(8)) + [55, 56], SamplingParams(max_tokens=2), version="v")
    sched.add(b)
    out, _ = fake_step(sched)
    assert ("b", 2) in [(r.request_id, n) for r, n in out.scheduled]
    assert b.num_cached_tokens == 8


def test_abort_returns_blocks():
    sched = Scheduler(BlockManager(8, 4), max_num_seqs=8, max_num_batched_tokens=100)
    a = make("a", 10)
    sched.add(a)
    fake_step(sched)
    sched.finish(a, RequestStatus.FINISHED_ABORTED)
    assert a.finish_reason == "abort" and not sched.has_unfinished()
    assert sched.block_manager.num_free_blocks == 8
