"""Open-AutoGLM: fast LLM generation, an OpenAI-compatible server, zero-downtime model updates."""

from open_autoglm.config import EngineConfig
from open_autoglm.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "AutoGLM", "AutoGLMEngine", "AsyncEngine", "EngineConfig", "SamplingParams", "__version__"]


def __getattr__(name: str):
    # torch and transformers load only when an engine is actually asked for.
    if name in ("LLM", "AutoGLM", "AutoGLMEngine"):
        from open_autoglm import llm

        return getattr(llm, name)
    if name == "AsyncEngine":
        from open_autoglm.engine.async_engine import AsyncEngine

        return AsyncEngine
    raise AttributeError(name)
