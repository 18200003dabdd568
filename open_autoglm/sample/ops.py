"""Pure tensor functions the sampler is built from. All take and return [B, V] float32 logits.

Every function is batched: per-row settings arrive as [B] tensors on the logits' device, so a
mixed batch costs the same kernels as a uniform one and nothing here syncs with the host.
A filter never removes a row's most likely token, so each row always keeps at least one token.
"""

from __future__ import annotations

import torch

# The smallest positive float32: keeps the exponential race free of 0/0 when a draw is exactly 0.
_TINY = torch.finfo(torch.float32).tiny


def token_stats(
    token_ids: torch.Tensor, num_output_tokens: torch.Tensor, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row token counts from a padded id matrix.

    token_ids [B, L]: each row is `output ids ++ prompt ids ++ padding`, padding = vocab_size (an
    extra column that is dropped, so padding needs no mask). The first num_output_tokens[b] entries
    of row b are output tokens.
    Returns (output_counts [B, V] float32, seen [B, V] bool): how often each token was generated,
    and whether it occurs in prompt or output (the CTRL repetition penalty's set).
    """
    num_rows, max_len = token_ids.shape
    positions = torch.arange(max_len, device=token_ids.device)
    is_output = (positions[None, :] < num_output_tokens[:, None]).float()  # [B, L]
    counts = torch.zeros(num_rows, vocab_size + 1, device=token_ids.device)
    counts.scatter_add_(1, token_ids, is_output)
    seen = torch.zeros(num_rows, vocab_size + 1, dtype=torch.bool, device=token_ids.device)
    seen.scatter_(1, token_ids, True)
    return counts[:, :vocab_size], seen[:, :vocab_size]


def apply_penalties(
    logits: torch.Tensor,
    output_counts: torch.Tensor,
    seen: torch.Tensor,
    repetition: torch.Tensor,
    presence: torch.Tensor,
    frequency: torch.Tensor,
) -> torch.Tensor:
    """Repetition penalty (CTRL, arXiv:1909.05858) then presence/frequency penalties (OpenAI).

    | penalty    | tokens it touches         | effect on logit x                          |
    |------------|---------------------------|--------------------------------------------|
    | repetition | prompt + output (`seen`)  | x / r if x > 0 else x * r                  |
    | presence   | output, count > 0         | x - presence                               |
    | frequency  | output                    | x - frequency * count                      |

    repetition / presence / frequency are [B]; neutral values are 1, 0, 0.
    """
    rep = repetition[:, None]
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalized, logits)
    logits = logits - frequency[:, None] * output_counts
    return logits - presence[:, None] * (output_counts > 0).float()


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the row's top probability.

    In log space p_i < min_p * p_max  <=>  x_i < x_max + log(min_p), so no softmax is needed; and
    min_p = 0 gives log(0) = -inf, which masks nothing.
    """
    threshold = logits.amax(dim=-1, keepdim=True) + torch.log(min_p)[:, None]
    return logits.masked_fill(logits < threshold, float("-inf"))


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Top-k then top-p (nucleus, arXiv:1904.09751) with one descending sort.

    top_k [B] int64: keep exactly the k highest (k <= 0 or k >= V keeps all; ties broken by the sort).
    top_p [B] float: after top-k, keep the smallest head of the sorted tokens whose probability
    mass reaches top_p; a token stays while the mass strictly before it is < top_p, so the first
    token always stays. Rows with top_p == 1 are left alone (float cumsums can reach 1 early).
    """
    vocab_size = logits.shape[-1]
    sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True)  # [B, V] each
    positions = torch.arange(vocab_size, device=logits.device)
    k = torch.where(top_k > 0, top_k, vocab_size)
    sorted_logits = sorted_logits.masked_fill(positions[None, :] >= k[:, None], float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop = (mass_before >= top_p[:, None]) & (top_p < 1)[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, sorted_ids, sorted_logits)


def exponential_race(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Sample one token per row: argmax(p_i / E_i), E_i ~ Exponential(1) i.i.d.

    The smallest E_i / p_i wins with probability p_i (the minimum of exponentials with rates p_i),
    so this is exact categorical sampling without torch.multinomial's host sync.
    """
    return (probs / noise.clamp_min(_TINY)).argmax(dim=-1)
