"""The tokenizer and special-token ids a GGUF file describes in its `tokenizer.ggml.*` metadata.

transformers' GGUF converters build the fast tokenizer; we show them the file alone and drop the
tokens they invent.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import gguf

from open_autoglm.errors import ModelLoadError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast


def generation_config(reader: gguf.GGUFReader, config: dict) -> dict:
    """bos/eos/pad ids; eos also lists the end-of-turn / end-of-message tokens when the file names them."""
    eos_ids = [config.get("eos_token_id")]
    eos_ids += [_token_id(reader, k) for k in ("eot", "eom")]
    eos_ids = list(dict.fromkeys(int(i) for i in eos_ids if i is not None))
    generation = {k: config[k] for k in ("bos_token_id", "pad_token_id") if k in config}
    if eos_ids:
        generation["eos_token_id"] = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    return generation


def _token_id(reader: gguf.GGUFReader, kind: str) -> int | None:
    """`tokenizer.ggml.{kind}_token_id`, if the file names one."""
    field = reader.fields.get(f"tokenizer.ggml.{kind}_token_id")
    return None if field is None else int(field.contents())


def build_tokenizer(path: Path, reader: gguf.GGUFReader, config: dict) -> PreTrainedTokenizerFast:
    """The fast tokenizer the metadata describes, built by transformers' GGUF converters.

    transformers prefers a tokenizer.json / tokenizer_config.json next to the GGUF over the GGUF's own
    metadata, so it is shown the file alone: a symlink in an otherwise empty temporary folder.
    """
    from transformers import AutoTokenizer  # lazy: slow import

    with tempfile.TemporaryDirectory(prefix="autoglm-gguf-tok-") as alone:
        (Path(alone) / path.name).symlink_to(path.resolve())
        try:
            tokenizer = AutoTokenizer.from_pretrained(alone, gguf_file=path.name, local_files_only=True)
        except Exception as e:
            raise ModelLoadError(f"{path}: cannot build the tokenizer from GGUF metadata ({e})") from e
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    _drop_invented_tokens(tokenizer, len(tokens.data) if tokens is not None else len(tokenizer))
    tokenizer.name_or_path = str(path)  # not the temporary folder
    tokenizer.model_max_length = config["max_position_embeddings"]
    for key in ("is_local", "local_files_only"):  # loading details, not tokenizer settings
        tokenizer.init_kwargs.pop(key, None)
    return tokenizer


def _drop_invented_tokens(tokenizer: PreTrainedTokenizerFast, num_tokens: int) -> None:
    """Remove added tokens with ids past the file's vocabulary.

    transformers builds byte-level GGUF vocabularies with GPT-2's class, which adds `<|endoftext|>` as
    its default unk/bos/eos when the vocabulary lacks it (Llama 3's does): an id the embedding table
    does not have.
    """
    if len(tokenizer) <= num_tokens:
        return
    from tokenizers import Tokenizer

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    invented = {t["content"] for t in state["added_tokens"] if t["id"] >= num_tokens}
    state["added_tokens"] = [t for t in state["added_tokens"] if t["id"] < num_tokens]
    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(state))  # the backend holds the vocabulary
    for attr in ("unk_token", "bos_token", "eos_token", "pad_token"):
        if getattr(tokenizer, attr) in invented:
            setattr(tokenizer, attr, None)
