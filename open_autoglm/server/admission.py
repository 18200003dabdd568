"""Admission control: a bounded waiting room in front of the engine.

    arriving request (weight = number of engine sequences it needs, n x prompts)
        running + weight <= max_running and nobody waiting  -> admitted now
        waiting + weight <= max_queued                      -> waits, first come first served
        otherwise                                           -> QueueFull   (429, Retry-After)
    waited longer than queue_timeout                        -> QueueTimeout (503, Retry-After)
    server draining                                         -> Draining     (503)

`max_running` is the engine's batch size (max_num_seqs), so the engine itself never holds more
than one batch; everything beyond that waits here, where it is bounded and visible. Nothing
here blocks the event loop and a cancelled waiter (client gone) leaves no trace.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass


class AdmissionError(Exception):
    """Base of the three ways a request can be refused."""


class QueueFull(AdmissionError):
    pass


class QueueTimeout(AdmissionError):
    pass


class Draining(AdmissionError):
    pass


@dataclass
class _Waiter:
    weight: int
    future: asyncio.Future


class Ticket:
    """Proof of admission; `release()` (idempotent) hands the slots back."""

    def __init__(self, controller: AdmissionController, weight: int) -> None:
        self._controller = controller
        self.weight = weight
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._controller._release(self.weight)


class AdmissionController:
    def __init__(self, max_running: int, max_queued: int, queue_timeout: float | None = None) -> None:
        if max_running < 1 or max_queued < 0:
            raise ValueError("max_running must be >= 1 and max_queued >= 0")
        self.max_running = max_running
        self.max_queued = max_queued
        self.queue_timeout = queue_timeout
        self.num_running = 0  # admitted sequences not yet released
        self.num_queued = 0   # sequences waiting
        self._waiters: deque[_Waiter] = deque()
        self.closed = False

    async def acquire(self, weight: int = 1) -> Ticket:
        if self.closed:
            raise Draining("server is shutting down")
        if weight > self.max_running:
            raise ValueError(f"a request of {weight} sequences can never run (max {self.max_running})")
        if not self._waiters and self.num_running + weight <= self.max_running:
            self.num_running += weight
            return Ticket(self, weight)
        if self.num_queued + weight > self.max_queued:
            raise QueueFull(f"server busy: {self.num_running} sequences running and {self.num_queued} "
                            f"waiting (limit {self.max_queued}); retry later")
        waiter = _Waiter(weight, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        self.num_queued += weight
        try:
            await asyncio.wait_for(asyncio.shield(waiter.future), self.queue_timeout)
        except BaseException as e:
            self._abandon(waiter)
            if isinstance(e, asyncio.TimeoutError):
                raise QueueTimeout(f"waited {self.queue_timeout:g}s in the queue without being scheduled") from None
            raise
        return Ticket(self, weight)

    def _abandon(self, waiter: _Waiter) -> None:
        """A waiter gave up (timeout, client gone, drain): un-queue it, or give back what it got."""
        if waiter.future.done() and not waiter.future.cancelled() and waiter.future.exception() is None:
            self._release(waiter.weight)  # admitted at the same moment it gave up
            return
        if waiter in self._waiters:
            self._waiters.remove(waiter)
            self.num_queued -= waiter.weight
            self._grant()  # a big waiter leaving may unblock smaller ones behind it

    def _release(self, weight: int) -> None:
        self.num_running -= weight
        self._grant()

    def _grant(self) -> None:
        while self._waiters and self.num_running + self._waiters[0].weight <= self.max_running:
            waiter = self._waiters.popleft()
            self.num_queued -= waiter.weight
            if waiter.future.done():  # already gave up
                continue
            self.num_running += waiter.weight
            waiter.future.set_result(None)

    def close(self) -> None:
        """Drain: refuse new requests and fail everyone still waiting."""
        self.closed = True
        while self._waiters:
            waiter = self._waiters.popleft()
            self.num_queued -= waiter.weight
            if not waiter.future.done():
                waiter.future.set_exception(Draining("server is shutting down"))
