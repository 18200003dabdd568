"""Errors of the model registry. Each message names the model, version, file or tensor at fault."""

from open_autoglm.errors import AutoGLMError


class RegistryError(AutoGLMError):
    """A registry operation was refused (unknown version, existing version id, bad folder, ...)."""


class DeltaError(RegistryError):
    """A delta package cannot be made, read or applied; nothing was changed."""
