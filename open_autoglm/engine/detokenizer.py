"""Streaming detokenization with stop strings.

Two things are held back between steps, for two different reasons:

| held back                        | why                                              | released when            |
|----------------------------------|--------------------------------------------------|--------------------------|
| tokens after `read_offset`       | their text ends in U+FFFD: a UTF-8 character is  | a later token completes  |
|                                  | split across byte-level / byte-fallback tokens   | it, or finish()          |
| text that is a prefix of a stop  | the next tokens may complete the stop string,    | the text stops matching, |
| string (`_held_text`)            | which must never be partially emitted            | or finish()              |

Text is defined as what the output adds to the prompt's text (vLLM semantics):

    decode(prompt_ids + output_ids)[len(decode(prompt_ids)):]      (skip_special_tokens as requested)

and the concatenation of all deltas plus finish() equals it, up to stop-string truncation. The
decode starts from the prompt's last few tokens (`_context`), not from the output alone: a
SentencePiece ("▁") decoder strips the leading space of the first token it sees, so decoding the
output alone would turn the prompt "Hello" + "▁world" into "world" instead of " world". A
byte-level BPE decoder is context-free, so for it this is decode(output_ids), as without context.
"""

from __future__ import annotations

from open_autoglm.sampling_params import SamplingParams

_REPLACEMENT_CHAR = "\ufffd"  # what a decoder yields for an incomplete UTF-8 byte sequence
_NUM_CONTEXT_TOKENS = 4  # prompt tokens decoded before the output (vLLM: 5 to 7)
_MAX_CONTEXT_TOKENS = 64  # ... or up to this many, to start on a whole character or a kept token
_MAX_CHAR_BYTES = 4  # a split UTF-8 character leaves at most 3 of its bytes at the prompt's end


class IncrementalDetokenizer:
    """Decodes one request's output tokens one at a time, in O(1) tokens per step.

    Prefix/read-offset technique (as in HF TGI and vLLM): decode the window
    ids[prefix_offset:] and the window ids[prefix_offset:read_offset], and emit the difference.
    The small context window gives the new token the spacing and merges it gets in the full text
    (a "▁" decoder strips the leading space of only the window's first token, which both decodes
    share), while its cost does not grow with the output length.

        ids:  ... | t_prefix ... t_read-1 | t_read ... t_last |
                    └ already emitted ┘     └ new, pending ┘

    `token_ids` starts with the prompt's last tokens, already "emitted" (prefix_offset 0,
    read_offset at the prompt's end), so the first window holds them as context; from then on the
    offsets move as usual and the steps cost what they cost without context.
    """

    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams,
                 final_only: bool = False) -> None:
        self.tokenizer = tokenizer
        self.params = params
        self.num_prompt_tokens = len(prompt_token_ids)
        self.output_text = ""  # everything emitted so far (after stop truncation)
        self.stop_reason: str | None = None  # the stop string that ended the output, if any
        self._held_text = ""  # decoded text withheld because it may begin a stop string
        self._max_stop_len = max((len(s) for s in params.stop), default=0)
        # The hot path calls the decode function directly: FastDecoder's Rust backend when it has one.
        fast = isinstance(tokenizer, FastDecoder)
        backend = tokenizer.backend if fast else None
        self._decode_fn = backend.decode if backend is not None else tokenizer.decode
        self._skip_special = params.skip_special_tokens
        self._single = tokenizer.single[self._skip_special] if fast else None  # decode([t]) memo
        # The decode window's list: prompt context, then the output (class docstring).
        self.token_ids, self._context_text = self._context(prompt_token_ids)
        self.num_context_tokens = len(self.token_ids)
        self._prefix_offset = 0
        self._read_offset = self.num_context_tokens
        # Nobody reads the deltas and no stop string needs matching: decode once, in finish(), the
        # context and everything after it, which is what the deltas concatenate to.
        self.deferred = final_only and not params.stop

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_context_tokens :]

    def _context(self, prompt_ids: list[int]) -> tuple[list[int], str]:
        """The prompt's last few tokens, to decode the output after, and their text. The text must
        start and end on whole characters (a split one reads as U+FFFD, and a byte-fallback decoder
        turns a whole byte run into U+FFFDs) and not be empty (e.g. special tokens, skipped), unless
        it is the whole prompt. Runs once per request; most prompts take one decode."""
        decode = self._decode
        for end in range(len(prompt_ids), max(len(prompt_ids) - _MAX_CHAR_BYTES, 0), -1):
            num = _NUM_CONTEXT_TOKENS
            while True:  # move the start back past split characters and skipped tokens
                start = max(end - num, 0)
                text = decode(prompt_ids[start:end])
                clean_start = text and not text.startswith(_REPLACEMENT_CHAR)
                if clean_start or start == 0 or num >= _MAX_CONTEXT_TOKENS:
                    break
                num *= 2
            if not text.endswith(_REPLACEMENT_CHAR):  # else the end splits a character: drop a token
                return prompt_ids[start:end], text
        return [], ""  # no usable context: decode the output alone

    def append(self, token_id: int) -> tuple[str, str | None]:
        """Add one generated token; return (text that is now safe to emit, the stop string matched or None)."""
        if self.stop_reason is not None:
            return "", None  # the output already ended at a stop string
        self.token_ids.append(token_id)
        if self.deferred:
            return "", None
        delta = self._decode_new(final=False)
        if self._max_stop_len == 0:  # no stop strings: nothing to match or hold back (_emit's no-op)
            if delta:
                self.output_text += delta
            return delta, None
        return self._emit(delta)

    def finish(self) -> str:
        """Text still held back, emitted when the request ends for another reason (length, eos, abort)."""
        if self.stop_reason is not None:
            return ""
        if self.deferred:  # everything was held back: decode the context and all after it at once
            self.output_text = self._decode(self.token_ids)[len(self._context_text) :]
            self._read_offset = len(self.token_ids)
            return self.output_text
        delta, _ = self._emit(self._decode_new(final=True), final=True)
        return delta

    def _decode(self, token_ids: list[int]) -> str:
        return self._decode_fn(token_ids, skip_special_tokens=self._skip_special)

    def _decode_new(self, final: bool) -> str:
        """Text of the tokens after read_offset, or "" while it ends in a split character.

        Offsets only move when text comes out, so held tokens stay in the next step's window.
        """
        ids = self.token_ids
        read = self._read_offset
        if read == len(ids):
            return ""
        prefix, decode, skip = self._prefix_offset, self._decode_fn, self._skip_special
        if read - prefix == 1 and self._single is not None:  # the usual window: the last emitted token
            prefix_text = self._single.get(ids[prefix])
            if prefix_text is None:
                prefix_text = self._single[ids[prefix]] = decode(ids[prefix:read], skip_special_tokens=skip)
        else:
            prefix_text = decode(ids[prefix:read], skip_special_tokens=skip) if read > prefix else ""
        new_text = decode(ids[prefix:], skip_special_tokens=skip)
        if len(new_text) <= len(prefix_text) and not final:
            return ""  # e.g. a skipped special token: keep it in the window for context
        if new_text.endswith(_REPLACEMENT_CHAR) and not final:
            return ""
        self._prefix_offset, self._read_offset = read, len(ids)
        return new_text[len(prefix_text) :]

    def _emit(self, delta: str, final: bool = False) -> tuple[str, str | None]:
        """Run stop-string matching over held + new text; update output_text."""
        text = self._held_text + delta
        self._held_text = ""
        match = self._find_stop(text)
        if match is not None:
            start, stop = match
            end = start + len(stop) if self.params.include_stop_str_in_output else start
            out, self.stop_reason = text[:end], stop
        elif final:
            out = text
        else:
            safe_len = self._safe_len(text)
            out, self._held_text = text[:safe_len], text[safe_len:]
        self.output_text += out
        return out, self.stop_reason

    def _find_stop(self, text: str) -> tuple[int, str] | None:
        """Earliest stop string in `text` (ties: the longer one), as (start index, stop string).

        Searching only held + new text suffices: emitted text never ends with a stop-string prefix.
        """
        best: tuple[int, str] | None = None
        for stop in self.params.stop:
            start = text.find(stop)
            if start < 0:
                continue
            if best is None or start < best[0] or (start == best[0] and len(stop) > len(best[1])):
                best = (start, stop)
        return best

    def _safe_len(self, text: str) -> int:
        """Length of the head of `text` that cannot be the start of a stop string."""
        for start in range(max(0, len(text) - self._max_stop_len + 1), len(text)):
            tail = text[start:]
            if any(stop.startswith(tail) for stop in self.params.stop):
                return start
        return len(text)


class FastDecoder:
    """`tokenizer.decode` minus transformers' per-call Python layers: for a fast tokenizer that does
    no clean-up, HF's decode is exactly the Rust backend's decode; the layers around it cost ~85 %
    of the detokenizer's time, which at batch 256 was half of all host time per step (5 of 11 ms
    on a 2-core CPU). Anything else goes through the tokenizer's own decode."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "_tokenizer", None)
        plain = backend is not None and hasattr(backend, "decode") and not getattr(tokenizer, "clean_up_tokenization_spaces", True)
        self.backend = backend if plain else None
        # decode([t]) memo per skip_special_tokens flag: the detokenizer's context window is one
        # token most steps, and one token's text depends on nothing else. At most one entry per id.
        self.single: tuple[dict[int, str], dict[int, str]] = ({}, {})

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        if self.backend is None:
            return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)
        return self.backend.decode(token_ids, skip_special_tokens=skip_special_tokens)
