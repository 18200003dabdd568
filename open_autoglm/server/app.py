"""`create_app()`: the FastAPI application, its state, and what runs before every route.

    request ─▶ Gate (pure ASGI): draining -> 503 | API key -> 401 | body size -> 413
            ─▶ routes: openai_routes (/v1/..., /infer), /health, /metrics, /v1/debug/kv,
                       admin routes (/admin/..., from server/admin.py when present)

Everything lives on `app.state.server` (a ServerState); `app.state.engine` is the AsyncEngine once
it exists. The engine loads on its own thread after startup, so the port answers at once and
/health says 503 until the model is ready.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import time
from collections.abc import Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from open_autoglm.config import EngineConfig
from open_autoglm.errors import ConfigError
from open_autoglm.server.admission import AdmissionController
from open_autoglm.server.errors import install_error_handlers
from open_autoglm.server.gate import Gate
from open_autoglm.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "smollm2-135m"  # = models.catalog.DEFAULT_MODEL (importing it would pull in torch)


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ServerSettings:
    """HTTP-side options (the engine's are EngineConfig). Each help feeds `serve --help`."""

    api_key: str | None = _opt(None, "require 'Authorization: Bearer KEY' on every route but /health and /metrics")
    served_model_name: str | None = _opt(None, "model name clients use (default: the --model value)")
    queue_timeout: float | None = _opt(None, "seconds a request may wait for admission before a 503 (default: no limit)")
    shutdown_timeout: float = _opt(30.0, "on SIGTERM, seconds in-flight requests get to finish before being aborted")
    max_body_bytes: int = _opt(4 << 20, "largest request body in bytes (larger: 413)")
    max_tokens_limit: int | None = _opt(None, "largest max_tokens a request may ask for (default: the context length)")
    max_n: int = _opt(64, "most sequences (prompts x n) in one request")

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_tokens_limit", "max_n"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ConfigError(name, f"must be a positive integer, got {value!r}")
        for name in ("queue_timeout", "shutdown_timeout"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(name, f"must be >= 0, got {value!r}")


class ServerState:
    """What the routes share; built by create_app, one per app."""

    def __init__(self, config: EngineConfig, settings: ServerSettings, engine=None) -> None:
        self.config = config
        self.settings = settings
        self.engine = engine  # AsyncEngine; None until startup has created it
        self.owns_engine = engine is None
        self.model_name = settings.served_model_name or config.model or DEFAULT_MODEL_NAME
        self.model_aliases = {self.model_name, config.model or DEFAULT_MODEL_NAME}
        if config.model:
            self.model_aliases.add(Path(config.model).name)
        self.metrics = ServerMetrics(self.model_name)
        self.admission = AdmissionController(config.max_num_seqs, config.max_queued_requests, settings.queue_timeout)
        self.draining = False
        self.active_ids: set[str] = set()  # engine sequence ids being served (aborted if a drain times out)
        self.started_at = time.time()

    @property
    def version(self) -> str:
        engine = self.engine
        return engine.engine.version if engine is not None and engine.is_ready else ""


def create_app(config: EngineConfig | None = None, settings: ServerSettings | None = None, *,
               engine=None, routers: Sequence[APIRouter] = ()) -> FastAPI:
    """The server for one model. `engine`: an AsyncEngine to serve (default: one built from config at
    startup and shut down with the app). `routers`: extra routes, included as they are."""
    from open_autoglm.server.openai_routes import router as openai_router

    config = config or (engine.config if engine is not None else EngineConfig())
    state = ServerState(config, settings or ServerSettings(), engine)
    app = FastAPI(title="Open-AutoGLM", lifespan=_lifespan, docs_url=None, redoc_url=None)
    app.state.server = state
    app.state.engine = engine
    install_error_handlers(app)
    app.add_middleware(Gate, state=state)
    app.include_router(openai_router)
    app.include_router(_service_router())
    admin = _admin_router()
    if admin is not None:
        app.include_router(admin, prefix="" if admin.prefix.startswith("/admin") else "/admin")
    for router in routers:
        app.include_router(router)
    return app


def _admin_router() -> APIRouter | None:
    """server/admin.py's `router` (live weight updates), if that module is installed."""
    try:
        admin = importlib.import_module("open_autoglm.server.admin")
    except ModuleNotFoundError as e:
        if e.name == "open_autoglm.server.admin":
            return None
        raise
    return getattr(admin, "router", None)


@asynccontextmanager
async def _lifespan(app: FastAPI):
    state: ServerState = app.state.server
    starter = asyncio.create_task(_start_engine(app, state))
    try:
        yield
    finally:
        starter.cancel()
        state.admission.close()
        if state.owns_engine and state.engine is not None:
            await asyncio.to_thread(state.engine.shutdown, 10.0)


async def _start_engine(app: FastAPI, state: ServerState) -> None:
    """Create the engine off the event loop (importing torch takes seconds), then log when it is ready."""
    if state.engine is None:
        module = await asyncio.to_thread(importlib.import_module, "open_autoglm.engine.async_engine")
        state.engine = module.AsyncEngine(state.config)  # returns at once; loads on its own thread
        app.state.engine = state.engine
    engine = state.engine
    while not engine.ready.is_set() and engine.load_error is None:
        await asyncio.sleep(0.1)
    if engine.load_error is not None:
        logger.error("engine failed to load: %s; /health answers 503", engine.load_error)
        return
    llm = engine.engine
    bm = llm.block_manager
    logger.info("serving model %r = %s, version %s, on %s; max_model_len %d; KV cache %d blocks x %d tokens = "
                "%d tokens", state.model_name, llm.model_path, llm.version, llm.device, llm.max_model_len,
                bm.num_blocks, bm.block_size, bm.num_blocks * bm.block_size)


def _service_router() -> APIRouter:
    router = APIRouter()

    @router.get("/health")
    async def health(request: Request) -> JSONResponse:
        state: ServerState = request.app.state.server
        engine = state.engine
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if engine is None or (engine.load_error is None and not engine.ready.is_set()):
            return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "5"})
        if not engine.is_alive:
            return JSONResponse({"status": "dead", "error": str(engine.load_error or "engine thread stopped")},
                                status_code=503)
        return JSONResponse({"status": "ok", "model": state.model_name, "version": state.version})

    @router.get("/metrics")
    async def metrics(request: Request) -> Response:
        state: ServerState = request.app.state.server
        stats = await engine_stats(state)
        if stats is not None:
            state.metrics.sync_engine(state.version, stats, state.admission.num_queued)
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @router.get("/v1/debug/kv")
    async def debug_kv(request: Request) -> JSONResponse:
        state: ServerState = request.app.state.server
        stats = await engine_stats(state)
        if stats is None:
            return JSONResponse({"status": "not ready"}, status_code=503)
        return JSONResponse({**stats, "admitted_sequences": state.admission.num_running,
                             "queued_sequences": state.admission.num_queued, "active_ids": len(state.active_ids)})

    return router


async def engine_stats(state: ServerState) -> dict | None:
    """LLMEngine.stats(), read on the engine thread between steps; None if it is not serving."""
    engine = state.engine
    if engine is None or not engine.is_ready:
        return None
    try:
        return await asyncio.wait_for(engine.call(lambda e: e.stats()), 10.0)
    except Exception:  # engine died or is stuck: the metrics page must still render
        logger.warning("could not read engine stats", exc_info=True)
        return None


async def drain(state: ServerState, timeout: float) -> None:
    """Graceful stop: refuse new work (503), give admitted requests `timeout` seconds, abort the rest."""
    state.draining = True
    state.admission.close()
    deadline = time.monotonic() + timeout
    logger.info("draining: %d sequences in flight, waiting up to %gs", state.admission.num_running, timeout)
    while state.admission.num_running > 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if state.admission.num_running > 0:
        logger.warning("shutdown timeout: aborting %d sequences still running", len(state.active_ids))
        for seq_id in list(state.active_ids):
            state.engine.abort_nowait(seq_id)
        deadline = time.monotonic() + 5.0
        while state.admission.num_running > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    logger.info("drained")
