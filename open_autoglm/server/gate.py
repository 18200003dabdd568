"""The checks every request passes before routing (pure ASGI, so streaming bodies are untouched).

    check            | applies to                          | refusal
    draining         | everything but /health and /metrics | 503 + Connection: close
    admin, no key    | /admin/... on a server without one  | 401 + WWW-Authenticate: Bearer
    API key          | everything but /health and /metrics | 401 + WWW-Authenticate: Bearer
    body size        | any request with a body             | 413 (read no further than the limit)

Admin routes replace the weights: they always need a key, from any peer (loopback included; a
local process is not proof of an operator). server/admin.py applies the same rule again, with
the same answers, so its router stays closed when mounted in an app without this gate.
"""

from __future__ import annotations

import hmac

from open_autoglm.server.errors import error_bytes, failure_reason

OPEN_PATHS = ("/health", "/metrics")
BEARER = [(b"www-authenticate", b"Bearer")]
ADMIN_KEY_REQUIRED = "the admin API needs an API key: start the server with --api-key"
INVALID_KEY = "missing or invalid API key: send 'Authorization: Bearer <key>'"


class Gate:
    def __init__(self, app, state) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path: str = scope["path"]
        settings = self.state.settings
        if path in OPEN_PATHS:
            return await self.app(scope, receive, send)
        if self.state.draining:
            return await self._refuse(send, 503, "server is shutting down", "shutting_down", [(b"connection", b"close")])
        if not settings.api_key and is_admin_path(path):
            return await self._refuse(send, 401, ADMIN_KEY_REQUIRED, "admin_key_required", BEARER)
        if settings.api_key and not authorized(scope, settings.api_key):
            return await self._refuse(send, 401, INVALID_KEY, "invalid_api_key", BEARER)
        limit = settings.max_body_bytes
        length = _header(scope, b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > limit:
                return await self._refuse(send, 413, f"request body is larger than {limit} bytes", "body_too_large")
        elif _header(scope, b"transfer-encoding") is not None:
            receive = await _buffered(receive, limit)
            if receive is None:
                return await self._refuse(send, 413, f"request body is larger than {limit} bytes", "body_too_large",
                                     [(b"connection", b"close")])
        return await self.app(scope, receive, send)

    async def _refuse(self, send, status: int, message: str, code: str, headers: list | None = None) -> None:
        self.state.metrics.fail(self.state.version, failure_reason(status, code))
        body = error_bytes(status, message, code)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                *(headers or [])]})
        await send({"type": "http.response.body", "body": body})


def _header(scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1").strip()
    return None


def is_admin_path(path: str) -> bool:
    return path == "/admin" or path.startswith("/admin/")


def authorized(scope, api_key: str) -> bool:
    """`Authorization: Bearer <api_key>` (compared in constant time)."""
    value = _header(scope, b"authorization") or ""
    scheme, _, token = value.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


async def _buffered(receive, limit: int):
    """Read a chunked body up to `limit`; a receive() that replays it, or None if it is too large."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return _replay([message], receive)
        size += len(message.get("body", b""))
        if size > limit:
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return _replay([{"type": "http.request", "body": b"".join(chunks), "more_body": False}], receive)


def _replay(messages: list[dict], receive):
    async def replayed():
        return messages.pop(0) if messages else await receive()

    return replayed
