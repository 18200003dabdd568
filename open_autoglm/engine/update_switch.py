"""The between-steps half of a live update: install a planned Switch, hold or drain per policy,
copy into the live weights, requeue every request onto the new version.

    update thread                          engine thread (UpdateManager.before_step -> advance)
    install(sw) ─────────────────────────▶ drain + requests in flight + before deadline?
    wait on sw.done                          yes: hold new WAITING requests, try again next step
                                             no:  copy_patch (restore on failure) -> on_switched
                                                  -> requeue -> sw.on_done -> ledger.finish
            ◀── sw.done ─────────────────────

Only this module moves requests between versions; a request's `version` is rewritten here and
nowhere else once it has been scheduled.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from open_autoglm.engine.request import RequestOutput, RequestStatus
from open_autoglm.engine.update_state import Identity, Switch, UpdateLedger, UpdateReport
from open_autoglm.worker import updates as wu
from open_autoglm.worker.updates import UpdateError

if TYPE_CHECKING:
    from open_autoglm.engine.llm_engine import LLMEngine


class SwitchRunner:
    """Holds the pending switch (at most one: the ledger's lock sees to it) and runs it on the
    engine thread. `on_switched(identity)` is called right after the copy succeeded."""

    def __init__(self, engine: LLMEngine, ledger: UpdateLedger, on_switched: Callable[[Identity], None]) -> None:
        self.engine = engine
        self.ledger = ledger
        self.on_switched = on_switched
        self.pending: Switch | None = None
        self.held: deque = deque()                 # new requests kept out of the queue while draining
        self.outputs: list[RequestOutput] = []     # outputs of requests the switch aborted

    def install(self, sw: Switch, policy: str, drain_timeout: float, driver) -> UpdateReport:
        """Hand `sw` to the engine thread and wait for it (driver = the AsyncEngine stepping the
        engine; None = we are that thread: the switch may still be pending when this returns)."""
        sw.policy, sw.report.stage = policy, "drain" if policy == "drain" else "switch"

        sw.installed = time.monotonic()  # "drain" counts from here: waiting for the step to end is not work
        sw.deadline = sw.installed + drain_timeout

        def install(_engine) -> None:
            self.pending = sw

        try:
            if driver is None:  # we are the thread that steps the engine
                install(self.engine)
                self.advance(sw)
                if not sw.done.done():
                    sw.report.status = "pending"  # completes in a later step(), once running requests finish
                    return sw.report
            else:
                driver.submit(install).result()
                while not sw.done.done():
                    with contextlib.suppress(concurrent.futures.TimeoutError):
                        sw.done.result(timeout=0.5)
                    if not sw.done.done() and not driver.is_alive:
                        raise UpdateError("switch", "the engine stopped while the update waited for its switch")
        except BaseException as e:
            if sw.done.done():
                raise
            self.pending = None  # the switch never ran
            raise self.ledger.abandon(sw.report, e) from None
        sw.done.result()  # raises the UpdateError of a failed switch
        return sw.report

    def advance(self, sw: Switch) -> None:
        """Engine thread, before a step: keep draining (holding new requests back), or switch now."""
        self.engine.settle()  # a step launched ahead is processed under the weights it ran with
        sched = self.engine.scheduler
        in_flight = bool(sched.running) or any(r.status == RequestStatus.PREEMPTED for r in sched.waiting)
        if sw.policy == "drain" and in_flight and time.monotonic() < sw.deadline:
            keep = [r for r in sched.waiting if r.status != RequestStatus.WAITING]
            self.held.extend(r for r in sched.waiting if r.status == RequestStatus.WAITING)
            sched.waiting.clear()
            sched.waiting.extend(keep)
            sw.report.requests["held"] = max(sw.report.requests.get("held", 0), len(self.held))
            return
        self.pending = None
        self._run(sw)

    def _run(self, sw: Switch) -> None:
        t0 = time.monotonic()
        sw.report.seconds["drain"] = round(t0 - sw.installed, 6)
        try:
            wu.copy_patch(sw.patch, sw.backup)
        except BaseException as err:
            self._requeue(sw, switched=False)
            self.ledger.finish(sw, err)
            return
        self.on_switched(sw.identity)
        self._requeue(sw, switched=True)
        sw.report.bytes_moved = sw.patch.nbytes
        sw.report.seconds["switch"] = round(time.monotonic() - t0, 6)
        sw.on_done()
        self.ledger.finish(sw, None)

    def _requeue(self, sw: Switch, switched: bool) -> None:
        """After the switch every request runs on the new weights: in-flight ones are recomputed
        (drain stragglers, recompute) or aborted; held and fresh ones are re-tagged."""
        sched = self.engine.scheduler
        fresh = [r for r in sched.waiting if r.status == RequestStatus.WAITING]
        held = [r for r in self.held if not r.status.finished]
        self.held.clear()
        if not switched:  # the old version keeps serving: held requests go back in arrival order
            older = [r for r in sched.waiting if r.status != RequestStatus.WAITING]
            sched.waiting.clear()
            sched.waiting.extend(older + held + fresh)
            return
        in_flight = list(sched.running) + [r for r in sched.waiting if r.status == RequestStatus.PREEMPTED]
        moved = self._abort_all(in_flight, sw.identity.version) if sw.policy == "abort" else self._reset(in_flight)
        queue = moved + held + fresh
        for r in queue:
            r.version = sw.identity.version
            self.engine.block_manager.forget_hashes(r)
        sched.waiting.clear()
        sched.waiting.extend(queue)
        counts = sw.report.requests
        counts["aborted" if sw.policy == "abort" else "recomputed"] = len(in_flight)
        counts["held"] = max(counts.get("held", 0), len(held))

    def _abort_all(self, requests: list, version: str) -> list:
        """Policy abort: each request ends with its own reason (the server shows `error`)."""
        for r in requests:
            r.error = f"aborted: weights updated to {version}"
            out = self.engine.abort_request(r.request_id)
            if out is not None:
                self.outputs.append(out)
        return []

    def _reset(self, requests: list) -> list:
        """Drop each request's KV; it is recomputed from its tokens so far (on the new weights)."""
        sched, bm = self.engine.scheduler, self.engine.block_manager
        for r in requests:
            if r in sched.running:
                sched.running.remove(r)
                bm.free(r)
            r.num_computed_tokens = 0
            r.status = RequestStatus.PREEMPTED
        return list(requests)
