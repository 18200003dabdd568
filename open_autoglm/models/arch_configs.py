"""Real architectures' configs, for benchmarks with random weights (nothing to download).

`random_model_folder(name, dir)` writes config.json and a stand-in tokenizer (one word per id)
so the engine runs the exact shapes of the real model; vLLM's benchmarks do the same with dummy
weights. Token ids, not text, are what these benchmarks measure.
"""

from __future__ import annotations

import json
from pathlib import Path

from open_autoglm.errors import ConfigError

ARCH_CONFIGS: dict[str, dict] = {
    "qwen2.5-1.5b": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 1536,
        "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
        "vocab_size": 151936, "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True, "hidden_act": "silu", "bos_token_id": 151643, "eos_token_id": 151643,
        "torch_dtype": "bfloat16",
    },
    "llama-3.1-8b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "vocab_size": 128256, "max_position_embeddings": 131072, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
        "tie_word_embeddings": False, "hidden_act": "silu", "bos_token_id": 128000, "eos_token_id": 128001,
        "torch_dtype": "bfloat16",
    },
}


def random_model_folder(name: str, directory: str | Path) -> Path:
    """A model folder with `name`'s config and a stand-in tokenizer; load it with load_format='dummy'."""
    if name not in ARCH_CONFIGS:
        raise ConfigError("arch_config", f"unknown {name!r}; known: {', '.join(ARCH_CONFIGS)}")
    folder = Path(directory) / name
    folder.mkdir(parents=True, exist_ok=True)
    config = ARCH_CONFIGS[name]
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if not (folder / "tokenizer.json").exists():
        _standin_tokenizer(config["vocab_size"], config["eos_token_id"]).save_pretrained(folder)
    return folder


def _standin_tokenizer(vocab_size: int, eos_id: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=f"t{eos_id}", unk_token="t0")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return fast


def write_random_checkpoint(name: str, directory: str | Path, seed: int = 0, device: str | None = None) -> Path:
    """A complete model folder (safetensors + config + stand-in tokenizer) with random bf16 weights:
    for benchmarks that need real files, e.g. live updates on a GPU machine with nothing to download."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = random_model_folder(name, directory)
    if any(folder.glob("*.safetensors")):
        return folder
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    config = AutoConfig.from_pretrained(folder)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    return folder


if __name__ == "__main__":  # python -m open_autoglm.models.arch_configs NAME DIR
    import sys

    print(write_random_checkpoint(sys.argv[1], sys.argv[2]))
