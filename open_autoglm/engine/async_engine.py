"""Drives an LLMEngine on a background thread; asyncio callers stream RequestOutputs.

    caller (event loop)                 engine thread
    generate() ── add command ───────▶  between steps: run commands (add, abort, update, ...)
               ◀── outputs per step ──  engine.step() -> call_soon_threadsafe(queue.put_nowait)

The engine is touched only by its thread, so adding, aborting and swapping weights always happen
between steps. torch releases the GIL inside kernels, so the event loop stays responsive.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from open_autoglm.config import EngineConfig
from open_autoglm.engine.llm_engine import LLMEngine
from open_autoglm.engine.request import RequestOutput
from open_autoglm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread has stopped; no request can be served."""


class AsyncEngine:
    def __init__(self, config: EngineConfig | None = None, engine: LLMEngine | None = None) -> None:
        self.config = config or (engine.config if engine else EngineConfig())
        self.engine: LLMEngine | None = engine
        self.ready = threading.Event()
        self.load_error: BaseException | None = None
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="autoglm-engine", daemon=True)
        self._thread.start()

    # -- state ----------------------------------------------------------------------------------
    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive() and self.load_error is None

    @property
    def is_ready(self) -> bool:
        return self.ready.is_set() and self.is_alive

    # -- API for callers on an event loop -----------------------------------------------------
    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream one request's outputs. Closing the iterator early (client gone) aborts it."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()

        def add(engine: LLMEngine) -> str:
            rid = engine.add_request(prompt, params, request_id)
            self._streams[rid] = (loop, outputs)
            return rid

        rid = await self.call(add)
        finished = False
        try:
            while not finished:
                out = await outputs.get()
                if isinstance(out, BaseException):
                    raise out
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort_nowait(rid)

    async def call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """Run fn(engine) on the engine thread between two steps; return (or raise) its result."""
        return await asyncio.wrap_future(self.submit(fn))

    def submit(self, fn: Callable[[LLMEngine], Any]) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        if not self._thread.is_alive():
            future.set_exception(EngineDeadError("engine is not running"))
            return future
        self._commands.put((fn, future))
        self._wakeup.set()
        return future

    def abort_nowait(self, request_id: str) -> None:
        def abort(engine: LLMEngine) -> None:
            out = engine.abort_request(request_id)
            if out is not None:
                self._dispatch([out])

        self.submit(abort)

    # -- live weight updates [updates hook]: load + verify on a worker thread, copy between steps --
    async def update_weights(self, source, policy: str = "drain", **options):
        """See LLMEngine.update_weights; requests keep flowing while the new weights load."""
        from open_autoglm.engine.updates import UpdateSource

        if not isinstance(source, UpdateSource):
            source = UpdateSource(path=str(source) if source is not None else None)
        return await asyncio.to_thread(self.engine.updates.update, source, policy, driver=self, **options)

    async def rollback(self, policy: str = "drain", **options):
        return await asyncio.to_thread(self.engine.updates.rollback, policy, driver=self, **options)

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop = True
        self._wakeup.set()
        self._thread.join(timeout)

    # -- the engine thread ------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            if self.engine is None:
                self.engine = LLMEngine(self.config)
        except BaseException as e:  # loading failed: report through health and every call
            logger.exception("engine failed to load")
            self.load_error = e
            self._fail_commands(e)
            return
        # Everything built so far (model, tokenizer, config) lives as long as the engine: keep it
        # out of the cyclic GC's full collections, which otherwise walk it all and pause the
        # engine thread for tens of ms now and then (seen as ITL spikes with no other cause).
        gc.freeze()
        self.ready.set()
        try:
            while not self._stop:
                self._run_commands()
                if self.engine.has_unfinished_requests():
                    self._dispatch(self.engine.step())
                else:
                    self._wakeup.wait(0.05)
                    self._wakeup.clear()
        except BaseException as e:
            logger.exception("engine loop died")
            self.load_error = e
            for loop, q in list(self._streams.values()):
                loop.call_soon_threadsafe(q.put_nowait, EngineDeadError(str(e)))
        finally:
            self._fail_commands(EngineDeadError("engine stopped"))

    def _run_commands(self) -> None:
        while True:
            try:
                fn, future = self._commands.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(self.engine))
            except BaseException as e:
                future.set_exception(e)

    def _fail_commands(self, error: BaseException) -> None:
        while True:
            try:
                _, future = self._commands.get_nowait()
            except queue.Empty:
                return
            if not future.done():
                future.set_exception(error)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            target = self._streams.get(out.request_id)
            if target is None:
                continue
            if out.finished:
                del self._streams[out.request_id]
            loop, q = target
            try:
                loop.call_soon_threadsafe(q.put_nowait, out)
            except RuntimeError:  # the caller's loop is closed: nobody is listening
                pass
