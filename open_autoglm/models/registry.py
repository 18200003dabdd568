"""Architectures we implement, keyed by the `architectures` value of config.json."""

from __future__ import annotations

from open_autoglm.errors import ModelLoadError
from open_autoglm.models.glm4 import Glm4ForCausalLM
from open_autoglm.models.llama import LlamaForCausalLM
from open_autoglm.models.qwen2 import Qwen2ForCausalLM

ARCHITECTURES = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Glm4ForCausalLM": Glm4ForCausalLM,
}


def model_class_for(hf_config) -> type:
    names = list(getattr(hf_config, "architectures", None) or [])
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    raise ModelLoadError(
        f"unsupported architecture {names or '(none given)'} in config.json; supported: {', '.join(ARCHITECTURES)}"
    )
