"""`autoglm serve`: options, and uvicorn run with a graceful drain on SIGTERM / Ctrl-C.

    first SIGTERM/SIGINT  -> drain: new requests 503, in-flight ones get --shutdown-timeout seconds,
                             the rest are aborted; then uvicorn stops and the process exits 0
    second signal         -> stop now
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import signal

import uvicorn

from open_autoglm.cli_args import add_engine_args, engine_config_from_args
from open_autoglm.errors import ConfigError
from open_autoglm.server.app import ServerSettings, ServerState, create_app, drain

logger = logging.getLogger(__name__)

_TYPES = {"int": int, "float": float, "str": str}


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, /infer, /metrics)",
        description="Serve one model over an OpenAI-compatible HTTP API. Without --model: the default model.")
    net = p.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    net.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    net.add_argument("--ssl-certfile", default=None, help="TLS certificate (PEM); serve HTTPS with --ssl-keyfile")
    net.add_argument("--ssl-keyfile", default=None, help="TLS private key (PEM)")
    net.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True,
                     help="log one line per HTTP request (default: on)")
    server = p.add_argument_group("server options")
    for f in dataclasses.fields(ServerSettings):
        kind = _TYPES[str(f.type).split("|")[0].strip()]
        help = f.metadata["help"] + (f" (default: {f.default})" if f.default is not None else "")
        server.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind, default=f.default, help=help)
    add_engine_args(p)
    p.set_defaults(func=serve)
    return p


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    return ServerSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServerSettings)})


def serve(args: argparse.Namespace) -> int:
    if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
        raise ConfigError("ssl", "give both --ssl-certfile and --ssl-keyfile, or neither")
    package_logger = logging.getLogger("open_autoglm")
    if package_logger.getEffectiveLevel() > logging.INFO:  # the startup lines are worth seeing
        package_logger.setLevel(logging.INFO)
    config = engine_config_from_args(args)
    app = create_app(config, settings_from_args(args))
    uv_config = uvicorn.Config(app, host=args.host, port=args.port, ssl_certfile=args.ssl_certfile,
                               ssl_keyfile=args.ssl_keyfile, access_log=args.access_log, log_level="info",
                               timeout_graceful_shutdown=5, lifespan="on")
    scheme = "https" if args.ssl_certfile else "http"
    logger.info("listening on %s://%s:%d (model %s loads in the background; /health is 503 until ready)%s",
                scheme, args.host, args.port, app.state.server.model_name,
                "; API key required" if args.api_key else "")
    server = DrainingServer(uv_config, app.state.server)
    server.run()
    return 0


class DrainingServer(uvicorn.Server):
    """uvicorn that drains on the first signal instead of closing the port (so latecomers get a
    clean 503, not a refused connection), and exits 0 afterwards (uvicorn would re-raise the signal)."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        if self._loop is None or self.state.draining or self.should_exit:
            self.should_exit = True
            self.force_exit = self.force_exit or (sig == signal.SIGINT and self.state.draining)
            return
        logger.info("received %s: draining for up to %gs", signal.Signals(sig).name, self.state.settings.shutdown_timeout)
        self.state.draining = True
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        try:
            await drain(self.state, self.state.settings.shutdown_timeout)
        finally:
            self.should_exit = True
