"""Exceptions the public API raises. Each names the field or file at fault."""


class AutoGLMError(Exception):
    """Base class of every error Open-AutoGLM raises on purpose."""


class ConfigError(AutoGLMError, ValueError):
    """An option has an unknown name or an invalid value; `key` names it."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


class ModelLoadError(AutoGLMError):
    """A model could not be found or loaded; the message names the path or file."""


class RequestError(AutoGLMError, ValueError):
    """A request cannot be served as asked (too long, empty prompt, ...); `field` names the culprit."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
