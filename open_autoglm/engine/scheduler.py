"""Continuous batching with one rule (no prefill/decode phases).

Every request has `num_computed_tokens` and `num_tokens`; each step hands out new tokens under a
token budget (`max_num_batched_tokens`) and a sequence budget (`max_num_seqs`):

    running requests first (FCFS), then waiting ones (FCFS) while budgets and blocks last.
    a request gets min(num_tokens - num_computed_tokens, remaining budget) tokens
        -> a long prompt is prefilled in chunks; a decoding request gets 1.
    out of blocks? preempt the most recently arrived running request (free its blocks, recompute
        it later from the prefix cache and its tokens so far).

Plain Python, no torch.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from open_autoglm.engine.block_manager import BlockManager
from open_autoglm.engine.request import Request, RequestStatus


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Request, int]] = field(default_factory=list)  # (request, num new tokens)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)

    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    # -- requests in and out ----------------------------------------------------------------
    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, request: Request, status: RequestStatus) -> None:
        """End a request (stop, length, abort, error) and return its blocks."""
        request.status = status
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.block_manager.free(request)

    def finish_many(self, requests: list[Request]) -> None:
        """End requests whose status is already set, freeing blocks in the given order: one pass
        over `running` for all of them (finish() per request is a scan each, O(batch²) when a
        whole batch ends in one step)."""
        done = set(requests)  # requests hash by identity
        kept = [r for r in self.running if r not in done]
        if len(self.running) - len(kept) != len(done):  # some were not running (e.g. waiting)
            waiting = [r for r in self.waiting if r not in done]
            self.waiting.clear()
            self.waiting.extend(waiting)
        self.running[:] = kept  # in place, like every other change to these queues
        for request in requests:
            self.block_manager.free(request)

    # -- the step -------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        budget = self._schedule_running(out, budget)
        if not out.preempted:
            self._schedule_waiting(out, budget)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        """Running requests in order; a decode row whose next slot is already allocated (the
        common case: a new block is needed once every block_size steps) skips the block manager."""
        running, scheduled, block_size = self.running, out.scheduled, self.block_manager.block_size
        i = 0
        while i < len(running) and budget > 0:
            request = running[i]
            computed = request.num_computed_tokens
            num_new = min(len(request.prompt_token_ids) + len(request.output_token_ids) - computed, budget)
            if computed + num_new > len(request.block_ids) * block_size:
                while not self.block_manager.allocate(request, num_new):
                    victim = running[-1]
                    self._preempt(victim, out)
                    if victim is request:
                        return budget  # the request itself was preempted: everything after it was too
            scheduled.append((request, num_new))
            budget -= num_new
            i += 1
        return budget

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        now = time.monotonic()
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            cached = self.block_manager.find_cached_prefix(request) if request.num_computed_tokens == 0 else []
            remaining = request.num_tokens - request.num_computed_tokens - len(cached) * self.block_manager.block_size
            num_new = min(remaining, budget)
            if not self.block_manager.allocate(request, num_new, cached):
                break
            if request.status == RequestStatus.WAITING:
                request.num_cached_tokens = len(cached) * self.block_manager.block_size
            if request.first_scheduled_time is None:  # running requests were all scheduled from here
                request.first_scheduled_time = now
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.scheduled.append((request, num_new))
            budget -= num_new

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        """Recompute-style preemption: drop the KV, keep the tokens, wait at the queue's head."""
        self.running.remove(request)
        self.block_manager.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        self.waiting.appendleft(request)
        out.preempted.append(request)
        self.num_preemptions += 1

    def update(self, out: SchedulerOutput) -> None:
        """Advance computed counts after the runner ran `out`, and register full blocks."""
        bm = self.block_manager
        caching, block_size = bm.enable_prefix_caching, bm.block_size
        for request, num_new in out.scheduled:
            computed = request.num_computed_tokens + num_new
            request.num_computed_tokens = computed
            # one new token fills a block only at a block boundary; skipping the call elsewhere
            # changes nothing (cache_full_blocks registers from the last registered block on)
            if caching and (num_new != 1 or computed % block_size == 0):
                bm.cache_full_blocks(request)
