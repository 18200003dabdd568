"""Alias package: `from openautoglm import AutoGLMEngine` works like `from open_autoglm import ...`."""

from open_autoglm import *  # noqa: F401,F403
from open_autoglm import __all__, __getattr__  # noqa: F401
