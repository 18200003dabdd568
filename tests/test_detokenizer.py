"""IncrementalDetokenizer on real tokenizers trained offline: byte-level BPE and SentencePiece-style."""

from __future__ import annotations

import json
import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from open_autoglm.engine.detokenizer import FastDecoder, IncrementalDetokenizer
from open_autoglm.sampling_params import SamplingParams

CORPUS = [
    "Hello world, this is a tiny corpus for a tiny tokenizer.",
    "The quick brown fox jumps over the lazy dog.",
    "stop here THE END of the story",
    "我们正在测试中文文本的分词。",
    "Emoji time 😀🎉 and more 🚀!",
] * 3
TEXTS = [
    "Hello world, the quick fox.",
    "我们正在测试中文 and English 混合",
    "Emoji 😀🎉🚀 time! 🚀",
    "  double  spaces\nnew line\ttab",
    "rare 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ünïcödé",
]


def byte_level_bpe() -> PreTrainedTokenizerFast:
    """GPT-2 style: multi-byte characters split into byte tokens that decode to U+FFFD alone."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<eos>"]
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def llama_style_bpe() -> PreTrainedTokenizerFast:
    """Llama/Mistral style: "▁" word starts, <0xXX> byte fallback, decoder strips one leading space."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator([t for t in CORPUS if t.isascii()], trainer)  # non-ASCII -> byte fallback
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def metaspace_bpe() -> PreTrainedTokenizerFast:
    """Newer SentencePiece conversions: Metaspace pre-tokenizer and decoder, no byte fallback."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"])
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")


@pytest.fixture(scope="module", params=["byte_level", "llama_style", "metaspace"])
def tokenizer(request) -> PreTrainedTokenizerFast:
    return {"byte_level": byte_level_bpe, "llama_style": llama_style_bpe, "metaspace": metaspace_bpe}[
        request.param
    ]()


@pytest.fixture(scope="module")
def byte_tok() -> PreTrainedTokenizerFast:
    return byte_level_bpe()


def encode(tok: PreTrainedTokenizerFast, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def continuation(tok, prompt_ids: list[int], ids: list[int], skip_special_tokens: bool = True) -> str:
    """What the output adds to the prompt's text: the detokenizer's definition of its text."""
    full = tok.decode(prompt_ids + ids, skip_special_tokens=skip_special_tokens)
    return full[len(tok.decode(prompt_ids, skip_special_tokens=skip_special_tokens)) :]


def stream(tok, ids: list[int], prompt_ids: list[int] | None = None,
           **params) -> tuple[list[str], str | None, IncrementalDetokenizer]:
    """Feeds ids one by one until a stop string; returns (deltas, matched stop, detokenizer)."""
    detok = IncrementalDetokenizer(tok, prompt_ids or [], SamplingParams(**params))
    deltas = []
    for token_id in ids:
        delta, stop = detok.append(token_id)
        deltas.append(delta)
        if stop is not None:
            return deltas, stop, detok
    return deltas, None, detok


# ---- plain streaming ---------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_decode_without_replacement_chars(tokenizer, text: str) -> None:
    ids = encode(tokenizer, text)
    deltas, stop, detok = stream(tokenizer, ids)
    tail = detok.finish()
    assert stop is None and tail == ""  # valid UTF-8: nothing should still be held at the end
    assert "".join(deltas) == detok.output_text == tokenizer.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in delta for delta in deltas)


def random_ids(tok: PreTrainedTokenizerFast, rng: random.Random, num_tokens: int) -> list[int]:
    """Random ids, special tokens included. Byte-fallback (<0xXX>) tokens only come as whole
    characters: the ByteFallback decoder turns a whole invalid byte run into U+FFFDs, so a later
    byte can change how earlier bytes decode, which no streaming decoder can match. Byte-level BPE
    decodes invalid bytes locally, so there every id is fair game, invalid UTF-8 included."""
    pool = [i for token, i in tok.get_vocab().items() if not token.startswith("<0x")]
    ids: list[int] = []
    while len(ids) < num_tokens:
        if rng.random() < 0.2:
            ids += encode(tok, rng.choice("中文😀éü🚀"))
        else:
            ids.append(rng.choice(pool))
    return ids


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_ids_concatenate_to_decode(tokenizer, skip_special_tokens: bool) -> None:
    """Random ids include special tokens and split characters; text must still match."""
    rng = random.Random(0)
    for _ in range(25):
        ids = random_ids(tokenizer, rng, rng.randrange(1, 40))
        deltas, _, detok = stream(tokenizer, ids, skip_special_tokens=skip_special_tokens)
        text = "".join(deltas) + detok.finish()
        assert text == detok.output_text == tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def test_split_emoji_is_held_until_complete(byte_tok) -> None:
    ids = encode(byte_tok, "a🚀")
    assert [byte_tok.decode([i]) for i in ids][1:] != ["🚀"]  # the emoji really spans byte tokens
    deltas, _, _ = stream(byte_tok, ids)
    assert deltas == ["a"] + [""] * (len(ids) - 2) + ["🚀"]


def test_leading_space_of_sentencepiece_words() -> None:
    tok = metaspace_bpe()
    ids = encode(tok, "Hello world,")
    assert tok.convert_ids_to_tokens(ids) == ["▁Hello", "▁world,"]
    deltas, _, _ = stream(tok, ids)
    assert deltas == ["Hello", " world,"]  # no prompt: decode(output_ids), whose first space is dropped
    deltas, _, _ = stream(tok, ids, prompt_ids=encode(tok, "Hi"))
    assert deltas == [" Hello", " world,"]  # after a prompt the first word keeps its space


def test_window_stays_small(byte_tok) -> None:
    """Each step decodes O(1) tokens, not the whole output."""
    sizes: list[int] = []

    class Recording:
        def decode(self, ids: list[int], **kwargs) -> str:
            sizes.append(len(ids))
            return byte_tok.decode(ids, **kwargs)

    ids = encode(byte_tok, " ".join(TEXTS) * 4)
    assert len(ids) > 200
    deltas, _, _ = stream(Recording(), ids)
    assert "".join(deltas) == byte_tok.decode(ids)
    assert max(sizes) <= 16  # bounded by the bytes of one character plus its context


# ---- the prompt as decoding context -----------------------------------------------------------------


@pytest.mark.parametrize("make", [metaspace_bpe, llama_style_bpe])
@pytest.mark.parametrize("prompt", ["Hello", "我们正在测试中文", "rare 😀"])  # llama_style: 2 end in <0x..>
def test_first_delta_keeps_its_leading_space(make, prompt: str) -> None:
    tok = make()
    prompt_ids, ids = encode(tok, prompt), encode(tok, " world")
    assert tok.convert_ids_to_tokens(ids)[0].startswith("▁")
    assert tok.decode(ids) == "world"  # decoded alone, the space is gone
    for decoder in (tok, FastDecoder(tok)):
        deltas, _, detok = stream(decoder, ids, prompt_ids)
        assert deltas[0].startswith(" ") and detok.finish() == ""
        assert "".join(deltas) == detok.output_text == " world" == continuation(tok, prompt_ids, ids)


def random_splits(tok, rng: random.Random):
    """(prompt ids, output ids) pairs: real text cut at every kind of token, and random ids.
    Not prompts that end inside a character: "what the output adds" is undefined there, as the
    output's first bytes change the prompt's last character (the U+FFFD it decodes to alone).
    Outputs end on whole characters, for the byte-fallback reason in random_ids."""
    texts = [ids for ids in (encode(tok, text) for text in TEXTS + CORPUS) if len(ids) > 1]
    num_splits = 0
    while num_splits < 80:
        ids = rng.choice(texts)
        cut = rng.randrange(1, len(ids))
        random_split = random_ids(tok, rng, rng.randrange(1, 12)), random_ids(tok, rng, rng.randrange(1, 30))
        for prompt_ids, output_ids in [(ids[:cut], ids[cut:]), random_split]:
            if not tok.decode(prompt_ids).endswith("\ufffd"):
                num_splits += 1
                yield prompt_ids, output_ids


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_text_is_what_the_output_adds_to_the_prompt(tokenizer, skip_special_tokens: bool) -> None:
    """decode(prompt + output) minus decode(prompt), streamed, deferred and through FastDecoder."""
    rng = random.Random(0)
    for prompt_ids, ids in random_splits(tokenizer, rng):
        want = continuation(tokenizer, prompt_ids, ids, skip_special_tokens)
        for decoder in (tokenizer, FastDecoder(tokenizer)):
            deltas, _, detok = stream(decoder, ids, prompt_ids, skip_special_tokens=skip_special_tokens)
            assert "".join(deltas) + detok.finish() == detok.output_text == want, (prompt_ids, ids)
            params = SamplingParams(skip_special_tokens=skip_special_tokens)
            final = IncrementalDetokenizer(decoder, prompt_ids, params, final_only=True)
            assert final.deferred and all(final.append(t) == ("", None) for t in ids)
            assert final.finish() == final.output_text == want


def test_prompt_ending_in_skipped_special_tokens(tokenizer) -> None:
    """Context reaches back past special tokens, which decode to nothing when skipped."""
    prompt_ids = encode(tokenizer, "Hello") + [tokenizer.eos_token_id] * 10
    ids = encode(tokenizer, " world")
    deltas, _, detok = stream(tokenizer, ids, prompt_ids)
    assert "".join(deltas) == detok.output_text == continuation(tokenizer, prompt_ids, ids) == " world"


def test_byte_level_text_does_not_depend_on_the_prompt(byte_tok) -> None:
    """A byte-level decoder is context-free: the same deltas as without a prompt, also after a
    prompt that ends inside a character (that part of the prompt is not used as context)."""
    split = encode(byte_tok, "a🚀")[:-1]
    prompts = [encode(byte_tok, "Hello"), encode(byte_tok, "我们"), split, [byte_tok.eos_token_id]]
    for text in TEXTS:
        ids = encode(byte_tok, text)
        alone, _, _ = stream(byte_tok, ids)
        for prompt_ids in prompts:
            deltas, _, detok = stream(FastDecoder(byte_tok), ids, prompt_ids)
            assert deltas == alone and detok.finish() == "" and detok.output_text == byte_tok.decode(ids)


def test_context_costs_only_the_first_step(tokenizer) -> None:
    """The prompt's tokens are decoded once; every later step decodes what it does without them."""

    def decode_sizes(prompt_ids: list[int]) -> list[int]:
        sizes: list[int] = []

        class Recording:
            def decode(self, ids: list[int], **kwargs) -> str:
                sizes.append(len(ids))
                return tokenizer.decode(ids, **kwargs)

        ids = encode(tokenizer, "The quick brown fox jumps over the lazy dog.")
        deltas, _, _ = stream(Recording(), ids, prompt_ids)
        assert deltas[0]  # the first token came out at once
        return sizes

    prompt_ids = encode(tokenizer, "Hello world, this is a tiny corpus")
    alone, primed = decode_sizes([]), decode_sizes(prompt_ids)
    # with context: one decode choosing it, then the first step decodes it with and without the token
    assert primed[:3] == [4, 4, 5] and primed[3:] == alone[1:]


# ---- stop strings ----------------------------------------------------------------------------------


def test_stop_string_across_tokens_is_never_partially_emitted(tokenizer) -> None:
    text = "stop here THE END of the story"
    ids = encode(tokenizer, text)
    deltas, stop, detok = stream(tokenizer, ids, stop=["THE END"])
    assert stop == "THE END"
    assert detok.output_text == "".join(deltas) == tokenizer.decode(ids).split("THE END")[0]
    assert "T" not in "".join(deltas)  # not even the first letter of the stop string got out
    assert len(deltas) < len(ids)  # matched on the token that completed it, not at the end
    assert detok.append(ids[-1]) == ("", None) and detok.finish() == ""  # the output is over


def test_stop_string_inside_multibyte_text(byte_tok) -> None:
    text = "我们正在测试中文文本的分词。"
    ids = encode(byte_tok, text)
    deltas, stop, detok = stream(byte_tok, ids, stop=["中文"])
    assert stop == "中文" and detok.output_text == "我们正在测试"
    assert not any("\ufffd" in d for d in deltas)


@pytest.mark.parametrize("stop_str", ["HE ", "E E", "D of", "ND o"])
def test_stop_string_spanning_two_or_three_tokens(byte_tok, stop_str: str) -> None:
    text = "stop here THE END of the story"
    ids = encode(byte_tok, text)
    pieces = [byte_tok.decode([i]) for i in ids]
    start = text.index(stop_str)
    ends = [len("".join(pieces[:n])) for n in range(len(pieces) + 1)]
    first = max(n for n in range(len(ids)) if ends[n] <= start)
    last = min(n for n in range(len(ids) + 1) if ends[n] >= start + len(stop_str))
    assert 2 <= last - first <= 3, pieces  # the stop string really crosses token boundaries
    deltas, stop, detok = stream(byte_tok, ids, stop=[stop_str])
    assert stop == stop_str and len(deltas) == last  # matched on the token that completes it
    assert detok.output_text == text[:start]


def test_include_stop_str_in_output(tokenizer) -> None:
    ids = encode(tokenizer, "stop here THE END of the story")
    deltas, stop, detok = stream(tokenizer, ids, stop=["THE END"], include_stop_str_in_output=True)
    assert stop == "THE END"
    assert "".join(deltas) == detok.output_text == tokenizer.decode(ids).split("THE END")[0] + "THE END"


def test_earliest_of_several_stop_strings_wins(byte_tok) -> None:
    ids = encode(byte_tok, "The quick brown fox jumps over the lazy dog.")
    # both complete on the token " fox"; the one that starts first ends the text
    deltas, stop, detok = stream(byte_tok, ids, stop=["lazy", "fox", "brown fox"])
    assert stop == "brown fox" and detok.output_text == "".join(deltas) == "The quick "
    # a stop string completed on an earlier token wins over a longer one still in progress
    _, stop, detok = stream(byte_tok, ids, stop=["quick brown fox", "brown"])
    assert stop == "brown" and detok.output_text == "The quick "


@pytest.mark.parametrize("stop_str", [" THE", "THE END"])
def test_stop_strings_after_a_prompt(tokenizer, stop_str: str) -> None:
    prompt_ids, ids = encode(tokenizer, "stop here"), encode(tokenizer, " THE END of the story")
    want = continuation(tokenizer, prompt_ids, ids)
    assert want.startswith(" THE END")
    deltas, stop, detok = stream(tokenizer, ids, prompt_ids, stop=[stop_str])
    assert stop == stop_str and "".join(deltas) == detok.output_text == want[: want.index(stop_str)]
    _, _, detok = stream(tokenizer, ids, prompt_ids, stop=[stop_str], include_stop_str_in_output=True)
    assert detok.output_text == want[: want.index(stop_str) + len(stop_str)]


def test_held_back_stop_prefix_released_by_finish(tokenizer) -> None:
    ids = encode(tokenizer, "the story THE EN")
    deltas, stop, detok = stream(tokenizer, ids, stop=["THE END"])
    assert stop is None
    full = tokenizer.decode(ids)
    assert "".join(deltas) == full[: full.index("THE EN")]  # the possible stop start was held
    assert detok.finish() == "THE EN"
    assert detok.output_text == full
