"""ModelConfig (config.json read without transformers) against transformers' AutoConfig, the
tokenizer class the loader picks against AutoTokenizer's, and what loading a folder imports."""

from __future__ import annotations

import copy
import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ARCH_CONFIGS as TINY_ARCHS
from conftest import CORPUS

from open_autoglm.errors import ModelLoadError
from open_autoglm.layers.rotary import hf_inv_freq
from open_autoglm.models import loader
from open_autoglm.models.arch_configs import ARCH_CONFIGS
from open_autoglm.models.model_config import FIELDS, ModelConfig, UnsupportedConfig
from open_autoglm.models.registry import ARCHITECTURES

# Every attribute our code reads from a model config (models/, worker/, engine/, bench/, server/).
ATTRIBUTES = ["model_type", "architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "vocab_size", "max_position_embeddings",
              "tie_word_embeddings", "attention_bias", "eos_token_id", "bos_token_id", "pad_token_id", "dtype",
              "torch_dtype", "rope_parameters"]
MODEL_TYPES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "glm4": "Glm4ForCausalLM"}
HEAVY_MODULES = ["transformers.models.auto.auto_factory", "transformers.utils.type_validators",
                 "torch.distributed.tensor"]


def _variants() -> dict[str, dict]:
    """config.json dicts with fields omitted (defaults decide), legacy rope keys, odd dtypes."""
    out: dict[str, dict] = {}
    for mt, arch in MODEL_TYPES.items():
        out[f"{mt}-minimal"] = {"model_type": mt, "architectures": [arch]}
        out[f"{mt}-legacy-keys"] = {
            "model_type": mt, "architectures": [arch], "hidden_size": 64, "num_attention_heads": 4,
            "num_hidden_layers": 2, "rope_theta": 500000, "torch_dtype": "float16", "max_length": 10,
            "custom_key": [1, 2], "_name_or_path": "org/name", "_commit_hash": "abc", "transformers_version": "4.40.0"}
        out[f"{mt}-linear"] = {"model_type": mt, "architectures": [arch], "rope_theta": 1e6,
                               "rope_scaling": {"type": "linear", "factor": 2.0}, "num_hidden_layers": 4,
                               "use_sliding_window": True, "sliding_window": 128, "max_window_layers": 2}
        out[f"{mt}-dynamic"] = {"model_type": mt, "architectures": [arch], "rope_parameters": {"rope_theta": 3.0},
                                "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}
        out[f"{mt}-yarn"] = {"model_type": mt, "architectures": [arch], "max_position_embeddings": 4096,
                             "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}}
        out[f"{mt}-dtypes-ids"] = {"model_type": mt, "architectures": [arch], "dtype": "float", "torch_dtype": "bfloat16",
                                   "num_hidden_layers": 2, "layer_types": ["full_attention"] * 2,
                                   "eos_token_id": [3, 4], "bos_token_id": None, "head_dim": 64}
    out["llama-partial-rotary"] = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 2,
                                   "partial_rotary_factor": 0.5, "num_key_value_heads": None}
    out["glm4-no-partial-rotary"] = {"model_type": "glm4", "partial_rotary_factor": None, "eos_token_id": 7}
    return out


VARIANTS = _variants()
CONFIG_CASES = [f"tiny:{a}" for a in TINY_ARCHS] + [f"arch:{n}" for n in ARCH_CONFIGS] + list(VARIANTS)


@pytest.fixture
def config_folder(tiny_checkpoint, tmp_path):
    def get(case: str) -> Path:
        if case.startswith("tiny:"):
            return tiny_checkpoint(case[5:])
        raw = ARCH_CONFIGS[case[5:]] if case.startswith("arch:") else VARIANTS[case]
        folder = tmp_path / case.replace(":", "-")
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(raw))
        return folder

    return get


def _head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def _comparable(d: dict) -> dict:
    return {k: v for k, v in d.items() if k != "transformers_version"}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_attributes_and_dict_equal_autoconfig(case, config_folder):
    from transformers import AutoConfig

    folder = config_folder(case)
    ours, theirs = ModelConfig.from_folder(folder), AutoConfig.from_pretrained(folder)
    missing = object()
    for name in ATTRIBUTES:
        assert getattr(ours, name, missing) == getattr(theirs, name, missing), name
    assert ours.head_dim == _head_dim(theirs)
    assert _comparable(ours.to_dict()) == _comparable(theirs.to_dict())
    assert ours.get("no_such_key", 5) == 5 and ours.get("vocab_size") == theirs.vocab_size


@pytest.mark.parametrize("case", [c for c in CONFIG_CASES if c != "llama-partial-rotary"])
def test_rotary_equals_transformers(case, config_folder):
    """inv_freq and attention scaling against the architecture's own transformers rotary module.
    (llama-partial-rotary is left out: transformers' Llama ignores partial_rotary_factor for the
    default rope type and hf_inv_freq does not; see the next test.)"""
    import transformers

    folder = config_folder(case)
    ours, theirs = ModelConfig.from_folder(folder), transformers.AutoConfig.from_pretrained(folder)
    prefix = {"llama": "Llama", "qwen2": "Qwen2", "glm4": "Glm4"}[ours.model_type]
    reference = getattr(transformers, f"{prefix}PreTrainedModel")  # imports the modeling module
    rotary = getattr(sys.modules[reference.__module__], f"{prefix}RotaryEmbedding")(config=theirs)
    inv_freq, scaling = hf_inv_freq(ours)
    assert torch.equal(inv_freq, rotary.inv_freq.float())
    assert scaling == rotary.attention_scaling
    assert [torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
            for a, b in zip(hf_inv_freq(theirs), (inv_freq, scaling), strict=True)] == [True, True]


def test_partial_rotary_of_llama_is_read_like_transformers(config_folder):
    """The config keeps partial_rotary_factor in rope_parameters exactly as transformers does; both
    config kinds give hf_inv_freq the same tables."""
    from transformers import AutoConfig

    folder = config_folder("llama-partial-rotary")
    ours, theirs = ModelConfig.from_folder(folder), AutoConfig.from_pretrained(folder)
    assert ours.rope_parameters == theirs.rope_parameters == {"rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                                              "rope_type": "default"}
    assert torch.equal(hf_inv_freq(ours)[0], hf_inv_freq(theirs)[0])


@pytest.mark.parametrize("mt", list(MODEL_TYPES))
def test_gguf_style_dict_equals_config_class(mt):
    """The GGUF loader builds the config from a dict: same result as the config class."""
    from transformers import CONFIG_MAPPING

    raw = {"architectures": [MODEL_TYPES[mt]], "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu", "rms_norm_eps": 1e-05,
           "rope_theta": 100000.0, "max_position_embeddings": 2048, "vocab_size": 320, "tie_word_embeddings": True,
           "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"}
    if mt == "llama":
        raw |= {"head_dim": 16, "attention_bias": False, "mlp_bias": False}
    ours = ModelConfig.from_dict({"model_type": mt, **raw})
    assert _comparable(ours.to_dict()) == _comparable(CONFIG_MAPPING[mt](**copy.deepcopy(raw)).to_dict())


@pytest.mark.parametrize("raw, reason", [
    ({"model_type": "mistral"}, "model_type"),
    ({"model_type": "llama", "rms_norm_eps": 1}, "rms_norm_eps"),  # transformers: int where float is declared
    ({"model_type": "llama", "hidden_size": 100, "num_attention_heads": 3}, "multiple"),
    ({"model_type": "qwen2", "rope_scaling": {"rope_type": "linear"}}, "rope"),  # no factor
    ({"model_type": "qwen2", "rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, "rope"),
    ({"model_type": "glm4", "num_key_value_heads": None}, "num_key_value_heads"),
    ({"model_type": "llama", "dtype": "auto"}, "dtype"),
    ({"model_type": "llama", "auto_map": {"AutoConfig": "x.Y"}}, "auto_map"),
    ({"model_type": "qwen2", "layer_types": ["full_attention"]}, "layer_types"),
])
def test_what_it_cannot_vouch_for_goes_to_transformers(raw, reason):
    with pytest.raises(UnsupportedConfig, match=reason):
        ModelConfig.from_dict(raw)


def test_open_source_falls_back_to_autoconfig(tiny_checkpoint, tmp_path):
    """Unknown-to-us keys go to AutoConfig (result kept); configs transformers rejects keep the old error."""
    from transformers import LlamaConfig

    folder = tmp_path / "m"
    shutil.copytree(tiny_checkpoint("llama"), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"id2label": {"0": "a", "1": "b"}}))
    source = loader.open_source(folder)
    assert isinstance(source.hf_config, LlamaConfig) and source.hf_config.id2label == {0: "a", 1: "b"}
    (folder / "config.json").write_text(json.dumps(config | {"rms_norm_eps": 1}))
    with pytest.raises(ModelLoadError, match="config.json: cannot read config: .*rms_norm_eps"):
        loader.open_source(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json: cannot read config"):
        loader.open_source(folder)


def test_model_config_is_read_only_data(tiny_checkpoint):
    cfg = ModelConfig.from_folder(tiny_checkpoint("glm4"))
    with pytest.raises(AttributeError):
        cfg.hidden_size = 3
    with pytest.raises(AttributeError, match="no_such"):
        _ = cfg.no_such
    assert not hasattr(cfg, "mlp_bias")  # glm4 has no such field (llama does)
    for clone in (copy.deepcopy(cfg), pickle.loads(pickle.dumps(cfg))):
        assert clone.to_dict() == cfg.to_dict() and clone.dtype == torch.float32
    d = cfg.to_dict()
    d["rope_parameters"]["rope_theta"] = 1.0
    assert cfg.rope_parameters["rope_theta"] == 10000.0


# --- tokenizer: the class AutoTokenizer would pick ---------------------------------------------

DECLARED = ["TokenizersBackend", "PreTrainedTokenizerFast", "LlamaTokenizerFast", "LlamaTokenizer",
            "GPT2TokenizerFast", "Qwen2Tokenizer", None]


@pytest.fixture(scope="module")
def standin_tokenizer_dir(tmp_path_factory):
    """A tokenizer.json without ByteLevel (WordLevel over whitespace): LlamaTokenizer stays LlamaTokenizer."""
    from open_autoglm.models.arch_configs import _standin_tokenizer

    folder = tmp_path_factory.mktemp("standin")
    _standin_tokenizer(400, 1).save_pretrained(folder)
    return folder


def _tokenizer_folder(tmp_path: Path, source: Path, model_type: str, declared: str | None) -> Path:
    folder = tmp_path / f"{model_type}-{declared}"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (source / name).exists():
            shutil.copy(source / name, folder / name)
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config.pop("tokenizer_class", None)
    if declared is not None:
        tokenizer_config["tokenizer_class"] = declared
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (folder / "config.json").write_text(json.dumps({"model_type": model_type, "architectures": [MODEL_TYPES[model_type]],
                                                    "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 400}))
    return folder


@pytest.mark.parametrize("byte_level", [True, False])
@pytest.mark.parametrize("declared", DECLARED)
@pytest.mark.parametrize("model_type", list(MODEL_TYPES))
def test_tokenizer_is_the_one_autotokenizer_loads(model_type, declared, byte_level, tiny_checkpoint,
                                                  standin_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    source = tiny_checkpoint("llama") if byte_level else standin_tokenizer_dir
    folder = _tokenizer_folder(tmp_path, source, model_type, declared)
    ours, theirs = loader.open_source(folder).tokenizer, AutoTokenizer.from_pretrained(folder)
    assert type(ours) is type(theirs)
    texts = CORPUS[:6] if byte_level else ["t1 t2 t399 t5", "t0 unknown t7"]
    assert [ours.encode(t) for t in texts] == [theirs.encode(t) for t in texts]
    assert ours.get_vocab() == theirs.get_vocab() and ours.special_tokens_map == theirs.special_tokens_map
    assert ours.chat_template == theirs.chat_template and ours.eos_token_id == theirs.eos_token_id
    assert ours.init_kwargs == theirs.init_kwargs


def test_tokenizer_tables_match_transformers():
    from transformers.models.auto import tokenization_auto as auto

    assert loader.TOKENIZERS_BACKEND_IDS == tuple(auto.MODEL_IDS_TO_TOKENIZERS_BACKEND)
    for model_type, forced in loader.TOKENIZER_FOR_MODEL_TYPE.items():
        assert auto.TOKENIZER_MAPPING_NAMES.get(model_type) == forced
        if forced not in (None, "TokenizersBackend"):  # it wins over any declared class only then
            assert model_type in auto.MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS


def test_model_types_cover_the_registry():
    assert set(MODEL_TYPES) == set(FIELDS) == set(loader.TOKENIZER_FOR_MODEL_TYPE)
    assert set(MODEL_TYPES.values()) == set(ARCHITECTURES)


# --- imports -------------------------------------------------------------------------------------

def test_loading_a_folder_skips_transformers_model_machinery(tiny_checkpoint):
    """open_source + build_model (llama3 rope included) in a fresh interpreter import neither
    AutoConfig's config modules nor AutoTokenizer's auto_factory (seconds of a cold start)."""
    folders = [str(tiny_checkpoint(arch)) for arch in TINY_ARCHS]
    code = f"""
import json, sys
from pathlib import Path
import torch
from open_autoglm.attention import get_attention_backend
from open_autoglm.models.loader import build_model, open_source
from open_autoglm.models.model_config import ModelConfig
heavy = {HEAVY_MODULES!r}
report = {{}}
for folder in {folders!r}:
    source = open_source(Path(folder))
    assert isinstance(source.hf_config, ModelConfig), type(source.hf_config)
    report[folder + " open"] = [m for m in heavy if m in sys.modules]
    build_model(source, torch.float32, torch.device("cpu"), get_attention_backend("torch", torch.device("cpu")),
                random_weights=True)
    report[folder + " build"] = [m for m in heavy if m in sys.modules]
print("REPORT " + json.dumps(report))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=300)
    line = next((x for x in out.stdout.splitlines() if x.startswith("REPORT ")), None)
    assert line is not None, out.stderr[-3000:]
    report = json.loads(line[len("REPORT "):])
    assert len(report) == 2 * len(folders) and report == {k: [] for k in report}
