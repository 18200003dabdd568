"""Overlapped decode steps: step N+1 is launched before step N's tokens reach the host.

Without overlap the GPU idles while the host waits for step N, appends its tokens, detokenizes,
builds outputs, schedules and launches step N+1 (~0.2 ms of a ~1.8 ms batch-1 step of
Qwen2.5-1.5B on an H100). With it, each `LLMEngine.step()` call of a decode phase does

    host:  update(N) | launch N+1 (its input ids: N's sampled ids, copied on the device) | wait for N | N's outputs
    GPU:   ........ step N ........|........ step N+1 ........

and returns step N's outputs (one step later than the synchronous path; the tokens are the same).

Only a plain continuation is launched ahead: every running request decodes again (nobody waits
to be admitted, no weight switch is due, no request reaches max_tokens at N) and no row reads its
tokens on the host to sample (penalties) or asks for logprobs. Anything else finishes step N
synchronously first, and the next step is scheduled as usual.

A request that ends at step N by EOS, a stop token or a stop string (known only once N is
processed), or is aborted meanwhile, still has a row in N+1: that row's token is dropped. Its KV
write lands in a block the request held at launch and freed afterwards; any later owner of the
block writes it in a later step, which the stream orders after this one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from open_autoglm.engine.request import Request, RequestStatus
from open_autoglm.engine.scheduler import Scheduler, SchedulerOutput


@dataclass
class InFlight:
    """A launched step whose tokens the host has not read yet."""

    batch: SchedulerOutput
    requests: list[Request]   # row i sampled token_ids[i]
    token_ids: torch.Tensor   # [B] int64 on the device: the next step's input ids
    host_ids: torch.Tensor    # [B] pinned host copy, complete once `ready` has fired
    ready: torch.cuda.Event | None
    updated: bool = False     # scheduler.update(batch) already applied

    @classmethod
    def launch(cls, batch: SchedulerOutput, requests: list[Request], token_ids: torch.Tensor) -> InFlight:
        if token_ids.device.type != "cuda":  # CPU: the step has already run
            return cls(batch, requests, token_ids, token_ids, None)
        host_ids = torch.empty(token_ids.shape, dtype=token_ids.dtype, pin_memory=True)
        host_ids.copy_(token_ids, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return cls(batch, requests, token_ids, host_ids, ready)

    def tokens(self) -> list[int]:
        """The sampled ids; waits for this step only (later launched steps keep running)."""
        if self.ready is not None:
            self.ready.synchronize()
        return self.host_ids.tolist()

    def live_batch(self) -> SchedulerOutput:
        """The batch without requests that ended, were aborted or preempted since its launch."""
        return SchedulerOutput([(r, n) for r, n in self.batch.scheduled if r.status is RequestStatus.RUNNING])


def launchable(batch: SchedulerOutput, sampling: list[Request], has_logprobs: bool) -> bool:
    """Whether a step just launched may be continued ahead: decode rows only, all sampling, and no
    row that needs its tokens on the host to sample the next one."""
    if has_logprobs or len(sampling) != len(batch.scheduled):
        return False
    if any(n != 1 for _, n in batch.scheduled):
        return False
    return not any(r.sampling_params.has_penalty for r in sampling)


def continuation(scheduler: Scheduler, prev: InFlight) -> SchedulerOutput | None:
    """Step N+1 as a plain continuation of `prev` (module docstring), its blocks allocated; None
    when it is not one. Applies scheduler.update(prev) either way once the batch is known to
    be unchanged (the caller checks `prev.updated`)."""
    rows = prev.requests
    running = scheduler.running
    if scheduler.waiting or len(running) != len(rows) or any(a is not b for a, b in zip(running, rows)):
        return None
    for request in rows:  # after N's token: still short of max_tokens, so it decodes again
        if request.status is not RequestStatus.RUNNING or request.num_tokens + 1 >= request.max_num_tokens:
            return None
    scheduler.update(prev.batch)
    prev.updated = True
    block_manager, block_size = scheduler.block_manager, scheduler.block_manager.block_size
    for request in rows:  # the slot of N's token, at position num_computed_tokens
        if request.num_computed_tokens + 1 > len(request.block_ids) * block_size:
            if not block_manager.allocate(request, 1):
                return None  # out of blocks: the scheduler decides (preemption) after N
    return SchedulerOutput([(r, 1) for r in rows])
