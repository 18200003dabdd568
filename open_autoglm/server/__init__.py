"""The OpenAI-compatible HTTP server: `create_app()` builds it, `autoglm serve` runs it."""

from open_autoglm.server.app import ServerSettings, create_app

__all__ = ["ServerSettings", "create_app"]
