"""Chat messages -> prompt token ids through the model's own chat template."""

from __future__ import annotations

from open_autoglm.errors import RequestError

ROLES = ("system", "user", "assistant", "tool", "developer")


def validate_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages", "must be a non-empty list of {role, content} objects")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise RequestError(f"messages[{i}]", "must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise RequestError(f"messages[{i}].role", f"unknown role {m['role']!r}; allowed: {', '.join(ROLES)}")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if not isinstance(content, str):
            raise RequestError(f"messages[{i}].content", "must be a string or a list of text parts")
        clean.append({"role": m["role"], "content": content})
    return clean


def chat_prompt_ids(tokenizer, messages, add_generation_prompt: bool = True) -> list[int]:
    messages = validate_messages(messages)
    if not getattr(tokenizer, "chat_template", None):
        raise RequestError("messages", "this model has no chat template; use a completion prompt instead")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    # The template writes any BOS itself; adding special tokens again would double it.
    return tokenizer.encode(text, add_special_tokens=False)
