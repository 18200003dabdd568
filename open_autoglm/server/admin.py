"""Admin routes: live weight updates of the running server (see docs/updates.md).

    route                  body                                       does
    GET  /admin/status     -                                          version, hash, history, resident versions
    POST /admin/update     source + policy (+ mode, staging, ...)     full hot swap (mode full) or delta
    POST /admin/delta      same                                       = /admin/update with mode delta
    POST /admin/rollback   {policy?, drain_timeout?}                  back to the version before the last update
    POST /admin/preload    source                                     keep a version in host memory (resident)

    source = {"path": folder | delta file} or {"model": NAME, "version": V | alias, "registry"?: DIR}

Always behind the API key, from any client: a server started without --api-key answers 401 on
every /admin route, saying to start it with --api-key (the key is what makes a route that
replaces the weights safe to expose; server/gate.py enforces it, require_admin_key repeats it). An update's load and verification run
on a worker thread; requests keep flowing and /health stays 200; only the copy is between steps.

    outcome                                          | status
    done (or already serving those weights: noop)    | 200, the UpdateReport
    refused: resolve / compat / base / verify        | 400 }
    another update or rollback in progress           | 409 } {"error": {..., "code", "param": stage},
    not enough memory to stage                       | 507 }  "stage", "serving_version"}
    failed: load / warmup / snapshot / switch        | 500 }
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Literal

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from pydantic import BaseModel, ConfigDict, Field

from open_autoglm.server.errors import APIError
from open_autoglm.server.gate import ADMIN_KEY_REQUIRED, INVALID_KEY, authorized

UPDATE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
STAGE_STATUS = {"resolve": 400, "compat": 400, "base": 400, "verify": 400, "memory": 507}


class SourceBody(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    path: str | None = Field(None, description="model folder (full swap) or delta file, on the server's disk")
    model: str | None = Field(None, description="registry model name")
    version: str | None = Field(None, description="registry version id or alias (default: the newest)")
    registry: str | None = Field(None, description="registry root (default: ~/.cache/open-autoglm/registry)")
    warmup_prompts: list[str] | None = Field(None, description="prompts the new weights must continue (finite "
                                                               "logits) before they serve; [] skips")


class UpdateBody(SourceBody):
    mode: Literal["full", "delta", "auto"] = "full"
    policy: Literal["drain", "recompute", "abort"] = "drain"
    staging: Literal["auto", "host", "device"] = "auto"
    drain_timeout: float | None = Field(None, ge=0, description="drain: seconds before stragglers are recomputed")


class RollbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    policy: Literal["drain", "recompute", "abort"] = "drain"
    drain_timeout: float | None = Field(None, ge=0)


def require_admin_key(request: Request) -> None:
    """The gate's rule (server/gate.py) again, for this router mounted in an app without the gate."""
    key = request.app.state.server.settings.api_key
    if not key:
        raise APIError(401, ADMIN_KEY_REQUIRED, code="admin_key_required", headers={"WWW-Authenticate": "Bearer"})
    if not authorized(request.scope, key):
        raise APIError(401, INVALID_KEY, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


@asynccontextmanager
async def _lifespan(app: FastAPI):
    state = app.state.server
    if not getattr(state, "update_metrics_registered", False):
        state.metrics.registry.register(UpdateCollector(state))
        state.update_metrics_registered = True
    yield


router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin_key)], lifespan=_lifespan)


def _engine(request: Request):
    from open_autoglm.server.serving import ready_engine

    engine, _ = ready_engine(request.app.state.server)
    return engine


@router.get("/status")
async def status(request: Request) -> dict:
    engine = _engine(request)
    return {"model": request.app.state.server.model_name, **engine.engine.updates.status()}


@router.post("/update")
async def update(body: UpdateBody, request: Request) -> JSONResponse:
    return await _update(request, body, body.mode)


@router.post("/delta")
async def delta(body: UpdateBody, request: Request) -> JSONResponse:
    return await _update(request, body, "delta")


@router.post("/rollback")
async def rollback(request: Request, body: RollbackBody | None = None) -> JSONResponse:
    body = body or RollbackBody()
    engine = _engine(request)
    return await _run(engine, engine.rollback(body.policy, drain_timeout=body.drain_timeout))


@router.post("/preload")
async def preload(body: SourceBody, request: Request) -> JSONResponse:
    import asyncio

    engine = _engine(request)
    updates = engine.engine.updates
    return await _run(engine, asyncio.to_thread(updates.preload, _source(body), body.warmup_prompts))


async def _update(request: Request, body: UpdateBody, mode: str) -> JSONResponse:
    engine = _engine(request)
    work = engine.update_weights(_source(body), body.policy, mode=mode, staging=body.staging,
                                 warmup_prompts=body.warmup_prompts, drain_timeout=body.drain_timeout)
    return await _run(engine, work)


def _source(body: SourceBody):
    from open_autoglm.engine.updates import UpdateSource

    if bool(body.path) == bool(body.model):
        raise APIError(400, "give exactly one of path (a folder or delta file) or model (+ version) from the registry",
                       param="path", code="invalid_source")
    return UpdateSource(path=body.path, model=body.model, version=body.version, registry=body.registry)


async def _run(engine, work) -> JSONResponse:
    from open_autoglm.worker.updates import UpdateError, UpdateInProgress

    try:
        report = await work
    except UpdateInProgress as e:
        return _error(409, str(e), "update_in_progress", None, engine)
    except UpdateError as e:
        return _error(STAGE_STATUS.get(e.stage, 500), str(e), "update_failed", e.stage, engine)
    except ValueError as e:
        return _error(400, str(e), "invalid_request", None, engine)
    return JSONResponse(report.to_json())


def _error(status: int, message: str, code: str, stage: str | None, engine) -> JSONResponse:
    kind = {409: "conflict_error", 507: "insufficient_storage"}.get(status, "update_error")
    if status == 400:
        kind = "invalid_request_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": stage, "code": code},
                         "stage": stage, "serving_version": engine.engine.version}, status_code=status)


class UpdateCollector:
    """autoglm_model_version_info, weight update durations / bytes / failures, rollbacks — read
    from the engine's UpdateManager at scrape time (updates made through the Python API count too)."""

    def __init__(self, state) -> None:
        self.state = state

    def describe(self):
        return self._families(None)

    def collect(self):
        engine = self.state.engine
        ready = engine is not None and engine.is_ready
        return self._families(engine.engine.updates if ready else None)

    def _families(self, updates) -> list:
        from open_autoglm.worker.updates import STAGES

        model = self.state.model_name
        info = GaugeMetricFamily("autoglm_model_version_info", "Weights version being served (value 1)",
                                 labels=["model", "version", "hash"])
        duration = HistogramMetricFamily("autoglm_weight_update_duration_seconds",
                                         "Successful weight updates, request to switch", labels=["model", "mode"])
        moved = CounterMetricFamily("autoglm_weight_update_bytes", "Bytes copied into the live weights",
                                    labels=["model", "mode"])
        failures = CounterMetricFamily("autoglm_weight_update_failures", "Failed or refused updates",
                                       labels=["model", "stage"])
        rollbacks = CounterMetricFamily("autoglm_rollbacks", "Rollbacks to the previous version", labels=["model"])
        families = [info, duration, moved, failures, rollbacks]
        if updates is None:
            return families
        ident, counters = updates.identity, updates.counters
        info.add_metric([model, ident.version, ident.manifest_hash or ""], 1)
        for mode in ("full", "delta", "rollback"):
            values = list(counters.durations.get(mode, ()))
            buckets = [(str(b), sum(v <= b for v in values)) for b in UPDATE_BUCKETS] + [("+Inf", len(values))]
            duration.add_metric([model, mode], buckets, sum(values))
            moved.add_metric([model, mode], counters.bytes.get(mode, 0))
        for stage in STAGES:
            failures.add_metric([model, stage], counters.failures.get(stage, 0))
        rollbacks.add_metric([model], counters.rollbacks)
        return families
