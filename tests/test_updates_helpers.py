"""Shared by the test_updates_* modules (no tests here): a tiny model's registry and a streaming reader."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from open_autoglm.bench.update import make_variant
from open_autoglm.registry import Registry

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], [40, 41, 42, 43, 44], [100, 7, 250, 3]]


def build_registry(work: Path, base: Path) -> Registry:
    """tiny v1 = `base`; v2 = ~30% of the bytes perturbed (a delta of v1); v3 = other random weights."""
    from conftest import write_tiny_checkpoint

    registry = Registry(work / "registry")
    registry.publish("tiny", base, version="v1")
    make_variant(base, work / "ft", fraction=0.3, seed=1)
    registry.publish("tiny", work / "ft", version="v2", parent="v1")
    write_tiny_checkpoint(work / "other", "llama", seed=7)
    registry.publish("tiny", work / "other", version="v3")
    return registry


def wider_checkpoint(folder: Path) -> Path:
    """The tiny llama with a wider MLP: same tensor names, other shapes."""
    import transformers
    from conftest import TINY, make_tokenizer

    tok = make_tokenizer(folder)
    config = transformers.LlamaConfig(vocab_size=len(tok), **{**TINY, "intermediate_size": 96})
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


async def stream(client: httpx.AsyncClient, body: dict, started=None) -> dict:
    """One streaming completion: token ids, the fingerprint of every chunk, errors, [DONE] or not."""
    out = {"status": None, "token_ids": [], "versions": [], "errors": [], "done": False, "finish_reason": None}
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True, "return_token_ids": True}) as r:
        out["status"] = r.status_code
        if r.status_code != 200:
            out["errors"].append((await r.aread()).decode())
            return out
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                out["done"] = True
                break
            chunk = json.loads(line[6:])
            if "error" in chunk:
                out["errors"].append(chunk)
                continue
            choice = chunk["choices"][0]
            out["token_ids"] += choice.get("token_ids", [])
            out["versions"].append(chunk["system_fingerprint"])
            out["finish_reason"] = choice["finish_reason"] or out["finish_reason"]
            if started is not None and out["token_ids"]:
                started.set()
    return out
