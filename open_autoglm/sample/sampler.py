"""Turns one step's logits into one token per request, without a host sync.

Pipeline per row (each stage is skipped for the whole batch when no row uses it):

    raw logits ──▶ penalties ──▶ / temperature ──▶ min-p ──▶ top-k ──▶ top-p ──▶ exponential race
       │                 └──────────────────────────────────────────────────▶ argmax (temperature 0)
       └──▶ log_softmax ──▶ logprobs (the raw model distribution, vLLM's default "raw_logprobs")

Logprobs describe what the model predicted, not the filtered distribution that was sampled from:
they stay comparable across requests with different sampling settings, and a greedy request's
logprobs are not degenerate 0 / -inf values.

Determinism: a request with `seed` draws its noise from its own torch.Generator, created on first
sight and kept across steps under its request_id, so its tokens depend only on its own logits,
never on the rest of the batch or on its row. Unseeded requests share one generator.
The engine must call the sampler only for rows that really sample a token this step (not for a
partial prefill chunk), and call `forget` when a request finishes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from open_autoglm.engine.request import Request
from open_autoglm.sample.ops import (
    apply_min_p,
    apply_penalties,
    apply_top_k_top_p,
    exponential_race,
    token_stats,
)
from open_autoglm.sampling_params import SamplingParams

# Columns of the per-row parameter table uploaded once per step (a float32 holds every top_k and
# output length exactly up to 2**24, far beyond any vocabulary or max_tokens).
_TEMPERATURE, _TOP_P, _MIN_P, _TOP_K, _REPETITION, _PRESENCE, _FREQUENCY, _NUM_OUTPUT = range(8)


@dataclass
class LogprobsTensors:
    """Logprobs of one step, still on the device. N = the largest `logprobs` asked in the batch."""

    token_logprobs: torch.Tensor  # [B] logprob of the sampled token
    top_ids: torch.Tensor  # [B, N] most likely tokens, most likely first
    top_logprobs: torch.Tensor  # [B, N]
    num_top: list[int | None]  # per row: how many alternatives it asked for; None = no logprobs


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [B] int64 on the logits' device; the engine's one .tolist() per step
    logprobs: LogprobsTensors | None = None  # only when some request asked for logprobs

    def logprobs_list(self) -> list[dict | None]:
        """Per request {"token_id", "logprob", "top": [(token_id, logprob), ...]}, or None.

        len(top) == params.logprobs. Copies to the host, so call it after token_ids.tolist().
        """
        if self.logprobs is None:
            return [None] * self.token_ids.shape[0]
        lp = self.logprobs
        token_ids = self.token_ids.tolist()
        token_logprobs = lp.token_logprobs.tolist()
        top_ids, top_logprobs = lp.top_ids.tolist(), lp.top_logprobs.tolist()
        result: list[dict | None] = []
        for row, num_top in enumerate(lp.num_top):
            if num_top is None:
                result.append(None)
                continue
            top = list(zip(top_ids[row][:num_top], top_logprobs[row][:num_top]))
            result.append({"token_id": token_ids[row], "logprob": token_logprobs[row], "top": top})
        return result


class Sampler:
    """Samples the next token of every request in a batch. See the module docstring."""

    def __init__(self, seed: int | None = None) -> None:
        self._seed = seed  # seed of the shared generator for unseeded requests (None = random)
        self._shared: torch.Generator | None = None
        self._seeded: dict[str, torch.Generator] = {}  # request_id -> that request's generator

    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> SamplerOutput:
        """logits [B, V] (any float dtype; computed in float32), row i belongs to requests[i]."""
        params = [req.sampling_params for req in requests]
        # Batch-wide checks over distinct settings: requests of a batch usually share a few
        # SamplingParams objects (LLM.generate passes one for all), so this is O(1) per step, not O(B).
        distinct = {id(p): p for p in params}.values()
        logits = logits.float()  # out-of-place ops below never modify the caller's tensor
        if all(p.greedy and not p.has_penalty for p in distinct):
            token_ids = logits.argmax(dim=-1)  # fast path: no parameter upload at all
        else:
            token_ids = self._sample(logits, requests, list(distinct))
        logprobs = None
        if any(p.logprobs is not None for p in distinct):
            logprobs = _logprobs(logits, token_ids, params)
        return SamplerOutput(token_ids=token_ids, logprobs=logprobs)

    def forget(self, request_id: str) -> None:
        """Drop a finished request's generator."""
        self._seeded.pop(request_id, None)

    def _sample(
        self, logits: torch.Tensor, requests: list[Request], params: list[SamplingParams]
    ) -> torch.Tensor:
        """`params`: the batch's distinct settings (batch-wide checks); per-row ones go in the table."""
        table = _param_table(requests, logits.device)
        if any(p.has_penalty for p in params):
            logits = _penalize(logits, requests, table)
        if all(p.greedy for p in params):
            return logits.argmax(dim=-1)
        temperature = table[:, _TEMPERATURE]
        is_greedy = temperature == 0
        greedy_ids = logits.argmax(dim=-1) if any(p.greedy for p in params) else None
        logits = logits / torch.where(is_greedy, 1.0, temperature)[:, None]
        if any(p.min_p > 0 for p in params):
            logits = apply_min_p(logits, table[:, _MIN_P])
        if any(p.top_k > 0 or p.top_p < 1 for p in params):
            logits = apply_top_k_top_p(logits, table[:, _TOP_K].long(), table[:, _TOP_P])
        probs = logits.softmax(dim=-1)
        token_ids = exponential_race(probs, self._noise(probs, requests))
        if greedy_ids is not None:
            token_ids = torch.where(is_greedy, greedy_ids, token_ids)
        return token_ids

    def _noise(self, probs: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """Exponential(1) noise [B, V]: shared generator for all rows, then seeded rows redrawn."""
        device = probs.device
        if self._shared is None or self._shared.device != device:
            self._shared = torch.Generator(device=device)
            if self._seed is None:
                self._shared.seed()
            else:
                self._shared.manual_seed(self._seed)
        noise = torch.empty_like(probs).exponential_(generator=self._shared)
        for row, req in enumerate(requests):  # inherently per request: each owns its generator
            params = req.sampling_params
            if params.seed is None or params.greedy:
                continue
            generator = self._seeded.get(req.request_id)
            if generator is None:
                generator = torch.Generator(device=device).manual_seed(params.seed)
                self._seeded[req.request_id] = generator
            noise[row].exponential_(generator=generator)
        return noise


def _param_table(requests: list[Request], device: torch.device) -> torch.Tensor:
    """[B, 8] float32 of per-row settings (columns named by the _* constants): one upload.

    One row of settings per distinct SamplingParams, gathered with numpy (torch.tensor on a
    nested list costs ~0.2 µs an element: ~0.4 ms at 256 rows); the output length per request."""
    index: dict[int, int] = {}
    settings: list[list[float]] = []
    rows: list[int] = []
    for req in requests:
        p = req.sampling_params
        i = index.get(id(p))
        if i is None:
            i = index[id(p)] = len(settings)
            settings.append([p.temperature, p.top_p, p.min_p, float(p.top_k), p.repetition_penalty,
                             p.presence_penalty, p.frequency_penalty])
        rows.append(i)
    host = torch.empty((len(requests), 8), dtype=torch.float32, pin_memory=device.type == "cuda")
    table = host.numpy()
    table[:, :_NUM_OUTPUT] = np.asarray(settings, dtype=np.float32)[rows]
    table[:, _NUM_OUTPUT] = [len(req.output_token_ids) for req in requests]
    # pinned + non_blocking on CUDA: the host does not wait for the copy (PyTorch's caching host
    # allocator keeps the pinned block alive until it has run)
    return host.to(device, non_blocking=True)


def _penalize(logits: torch.Tensor, requests: list[Request], table: torch.Tensor) -> torch.Tensor:
    """Uploads each penalized row's token ids (one padded tensor) and applies the penalties.

    Row b is `output ids ++ prompt ids`; rows without penalties are empty, so a long prompt costs
    nothing unless its request asked for a repetition penalty (the only one that reads the prompt).
    """
    vocab_size = logits.shape[-1]
    segments: list[tuple[list[int], ...]] = []
    for req in requests:
        p = req.sampling_params
        if p.repetition_penalty != 1.0:
            segments.append((req.output_token_ids, req.prompt_token_ids))
        elif p.has_penalty:
            segments.append((req.output_token_ids,))
        else:
            segments.append(())
    if all(sum(map(len, row)) == 0 for row in segments):
        return logits  # nothing generated yet and no prompt-based penalty
    token_ids = _upload_padded(segments, vocab_size, logits.device)  # [B, L]
    # Empty rows are all padding, which lands in the dropped column whatever their output length.
    counts, seen = token_stats(token_ids, table[:, _NUM_OUTPUT].long(), vocab_size)
    return apply_penalties(
        logits, counts, seen, table[:, _REPETITION], table[:, _PRESENCE], table[:, _FREQUENCY]
    )


def _upload_padded(segments: list[tuple[list[int], ...]], pad: int, device: torch.device) -> torch.Tensor:
    """[B, L] int64: row b is the concatenation of segments[b], right-padded with `pad`.

    Filled through a numpy view (one C-level copy per list, several times faster than torch.tensor
    on nested lists, which dominated the step for long prompts), in pinned memory on CUDA so the
    host->device copy is asynchronous.
    """
    lengths = [sum(map(len, row)) for row in segments]
    host = torch.empty((len(segments), max(lengths)), dtype=torch.int64, pin_memory=device.type == "cuda")
    array = host.numpy()
    array.fill(pad)
    for row, parts in enumerate(segments):
        start = 0
        for part in parts:
            array[row, start : start + len(part)] = part
            start += len(part)
    return host.to(device, non_blocking=True)


def _logprobs(logits: torch.Tensor, token_ids: torch.Tensor, params: list[SamplingParams]) -> LogprobsTensors:
    """Logprobs of the raw model distribution (before penalties, temperature and filters)."""
    logprobs = logits.log_softmax(dim=-1)  # [B, V]
    num_top = [p.logprobs for p in params]
    max_top = max(n for n in num_top if n is not None)
    top_logprobs, top_ids = logprobs.topk(max_top, dim=-1)  # [B, N]; N may be 0
    token_logprobs = logprobs.gather(1, token_ids[:, None]).squeeze(1)  # [B]
    return LogprobsTensors(
        token_logprobs=token_logprobs, top_ids=top_ids, top_logprobs=top_logprobs, num_top=num_top
    )
