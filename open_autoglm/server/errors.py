"""Every error the server returns has the OpenAI shape, whatever raised it.

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens", "code": null}}

    cause                                     | status | type
    malformed JSON, wrong type, bad value     |  400   | invalid_request_error
    missing / wrong API key                   |  401   | authentication_error
    body over --max-body-bytes                |  413   | invalid_request_error
    waiting queue full                        |  429   | rate_limit_error (+ Retry-After)
    loading, draining, queue timeout          |  503   | service_unavailable (+ Retry-After)
    a failure inside one request              |  500   | server_error
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from open_autoglm.errors import RequestError
from open_autoglm.sampling_params import SamplingParamsError

logger = logging.getLogger(__name__)

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 408: "timeout_error", 413: "invalid_request_error",
               429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}


class APIError(Exception):
    """An error response: status, message, and the OpenAI `param` / `code` it concerns."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None, counted: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}
        self.counted = counted  # already in autoglm_request_failure_total (per sequence)

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"),
                      "param": param, "code": code}}


def error_bytes(status: int, message: str, code: str | None = None) -> bytes:
    return json.dumps(error_body(status, message, None, code)).encode()


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


def from_exception(e: BaseException) -> APIError:
    """Map a validation error raised below the server (engine, sampling, chat) onto a 400."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, (RequestError, SamplingParamsError)):
        return bad_request(str(e), e.field)
    return APIError(500, f"internal error: {type(e).__name__}: {e}", code="internal_error")


TYPE_TAGS = ("str", "int", "float", "bool", "list", "dict", "none")


def _split_loc(err: dict) -> tuple[str | None, str | None]:
    """('body', 'prompt', 'list[int]', 1) -> ('prompt', 'list[int]'): the field, and the union member
    pydantic tried (its tags are type names, never field names)."""
    parts: list[str] = []
    for p in err.get("loc", ())[1:] if err.get("loc", ("",))[0] == "body" else err.get("loc", ()):
        p = str(p)
        if "[" in p or p in TYPE_TAGS or p.startswith(("function-", "is-instance")):
            return ".".join(parts) or None, p
        parts.append(p)
    return ".".join(parts) or None, None


def _validation_message(errors: list[dict]) -> tuple[str, str | None]:
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    param, member = _split_loc(first)
    if param is None:
        return "request body must be a JSON object (send Content-Type: application/json)", None
    if member is not None:  # a union: say which shapes are accepted, not each member's complaint
        members = list(dict.fromkeys(m for e in errors if _split_loc(e) == (param, m := _split_loc(e)[1]) and m))
        return f"{param}: invalid value {_short(first.get('input'))}; expected {' or '.join(members)}", param
    if first.get("type") == "missing":
        message = f"{param}: required field is missing"
    else:
        message = f"{param}: {first.get('msg')} (got {_short(first.get('input'))})"
    others = sum(1 for e in errors if _split_loc(e)[0] != param)
    if others:
        message += f" (and {others} more error{'s' if others > 1 else ''})"
    return message, param


def _short(value) -> str:
    text = json.dumps(value, default=str) if value is not None else "null"
    return text if len(text) <= 80 else text[:77] + "..."


def failure_reason(status: int, code: str | None) -> str:
    """The `reason` label of autoglm_request_failure_total for a refusal."""
    if status == 401:
        return "unauthorized"
    if 400 <= status < 500:
        return "invalid_request"
    return code or "internal_error"


def count_failure(request: Request, status: int, code: str | None = None) -> None:
    state = getattr(request.app.state, "server", None)
    if state is not None:
        state.metrics.fail(state.version, failure_reason(status, code))


def install_error_handlers(app: FastAPI) -> None:
    """FastAPI's defaults (422 with its own shape, HTML-less 404s, bare 500s) become OpenAI bodies;
    each refusal is counted once in autoglm_request_failure_total."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        if not e.counted:
            count_failure(request, e.status, e.code)
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError) -> JSONResponse:
        errors = list(e.errors())
        message, param = _validation_message(errors) if errors else ("invalid request", None)
        count_failure(request, 400)
        return JSONResponse(error_body(400, message, param), status_code=400)

    @app.exception_handler(RequestError)
    @app.exception_handler(SamplingParamsError)
    async def _field_error(request: Request, e: RequestError | SamplingParamsError) -> JSONResponse:
        count_failure(request, 400)
        return from_exception(e).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        count_failure(request, e.status_code)
        return JSONResponse(error_body(e.status_code, str(e.detail)), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        count_failure(request, 500, "internal_error")
        return JSONResponse(error_body(500, f"internal error: {type(e).__name__}", code="internal_error"),
                            status_code=500)
