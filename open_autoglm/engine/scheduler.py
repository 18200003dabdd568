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

    # -- the step -------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        budget = self._schedule_running(out, budget)
        if not out.preempted:
            self._schedule_waiting(out, budget)
        now = time.monotonic()
        for request, _ in out.scheduled:
            if request.first_scheduled_time is None:
                request.first_scheduled_time = now
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            while not self.block_manager.allocate(request, num_new):
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is request:
                    break
            else:
                out.scheduled.append((request, num_new))
                budget -= num_new
                i += 1
                continue
            break  # the request itself was preempted: everything after it was too
        return budget

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            cached = self.block_manager.find_cached_prefix(request) if request.num_computed_tokens == 0 else []
            remaining = request.num_tokens - request.num_computed_tokens - len(cached) * self.block_manager.block_size
            num_new = min(remaining, budget)
            if not self.block_manager.allocate(request, num_new, cached):
                break
            if request.status == RequestStatus.WAITING:
                request.num_cached_tokens = len(cached) * self.block_manager.block_size
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
        for request, num_new in out.scheduled:
            request.num_computed_tokens += num_new
            self.block_manager.cache_full_blocks(request)
