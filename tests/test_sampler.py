"""Sampler: exact masks on hand-built logits, penalties by definition, seeded determinism, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from open_autoglm.engine.request import Request
from open_autoglm.sample import Sampler
from open_autoglm.sample.ops import (
    apply_min_p,
    apply_penalties,
    apply_top_k_top_p,
    exponential_race,
    token_stats,
)
from open_autoglm.sampling_params import SamplingParams

NEG_INF = float("-inf")


def make_request(
    request_id: str = "r", prompt: list[int] | None = None, output: list[int] | None = None, **params
) -> Request:
    return Request(
        request_id=request_id,
        prompt_token_ids=list(prompt or [0]),
        sampling_params=SamplingParams(**params),
        output_token_ids=list(output or []),
    )


def sampled_set(logits_row: list[float], num_samples: int = 4000, **params) -> set[int]:
    """Distinct tokens drawn when the same row is sampled num_samples times (one batched call)."""
    logits = torch.tensor([logits_row]).repeat(num_samples, 1)
    requests = [make_request(f"r{i}", **params) for i in range(num_samples)]
    return set(Sampler(seed=0)(logits, requests).token_ids.tolist())


def log_probs(probs: list[float]) -> list[float]:
    return [math.log(p) for p in probs]


# ---- greedy ---------------------------------------------------------------------------------


def test_greedy_equals_argmax_fast_path_and_mixed_batch() -> None:
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1))
    expected = logits.argmax(dim=-1)
    all_greedy = [make_request(f"g{i}", temperature=0.0) for i in range(6)]
    assert torch.equal(Sampler()(logits, all_greedy).token_ids, expected)
    mixed = [make_request(f"m{i}", temperature=0.0 if i % 2 else 1.0) for i in range(6)]
    out = Sampler()(logits, mixed).token_ids
    assert out.dtype == torch.int64 and out.shape == (6,)
    assert torch.equal(out[1::2], expected[1::2])


def test_bf16_logits_and_caller_tensor_untouched() -> None:
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(2))
    original = logits.clone()
    reqs = [
        make_request(
            f"r{i}", temperature=0.7, top_k=5, top_p=0.9, min_p=0.05, repetition_penalty=1.3, output=[1, 2]
        )
        for i in range(3)
    ]
    Sampler(seed=0)(logits, reqs)
    assert torch.equal(logits, original)
    out = Sampler(seed=0)(logits.bfloat16(), [make_request(f"b{i}", temperature=0.0) for i in range(3)])
    assert torch.equal(out.token_ids, logits.bfloat16().float().argmax(dim=-1))


# ---- filters: exact masks --------------------------------------------------------------------


def test_top_k_mask_exact_and_sampled_set() -> None:
    logits = torch.tensor([[5.0, 1.0, 4.0, 3.0, 2.0, 0.0]])
    masked = apply_top_k_top_p(logits, torch.tensor([3]), torch.tensor([1.0]))
    assert torch.isinf(masked).tolist() == [[False, True, False, False, True, True]]
    assert torch.equal(masked[0, [0, 2, 3]], logits[0, [0, 2, 3]])  # survivors keep their logits
    assert sampled_set([5.0, 1.0, 4.0, 3.0, 2.0, 0.0], top_k=3, temperature=3.0) == {0, 2, 3}
    assert sampled_set([1.0, 1.1, 0.9, 1.2], top_k=-1) == {0, 1, 2, 3}  # -1 and 0 mean off


def test_top_p_mask_exact_and_sampled_set() -> None:
    row = log_probs([0.15, 0.5, 0.05, 0.3])  # sorted: 1 (0.5), 3 (0.3), 0 (0.15), 2 (0.05)
    logits = torch.tensor([row, row, row])
    masked = apply_top_k_top_p(logits, torch.tensor([0, 0, 0]), torch.tensor([0.75, 0.85, 0.3]))
    assert torch.isinf(masked).tolist() == [
        [True, False, True, False],  # 0.5 < 0.75 keeps token 3; 0.8 >= 0.75 drops token 0
        [False, False, True, False],
        [True, False, True, True],  # the top token always stays
    ]
    assert sampled_set(row, top_p=0.75) == {1, 3}
    assert sampled_set(row, top_p=0.85) == {0, 1, 3}


def test_top_k_then_top_p_renormalizes() -> None:
    row = log_probs([0.4, 0.3, 0.2, 0.1])
    # After top-k=2 the kept mass is 0.4/0.7 = 0.57 and 0.43: top_p=0.5 keeps only token 0.
    masked = apply_top_k_top_p(torch.tensor([row]), torch.tensor([2]), torch.tensor([0.5]))
    assert torch.isinf(masked).tolist() == [[False, True, True, True]]
    assert sampled_set(row, top_k=2, top_p=0.6) == {0, 1}


def test_min_p_mask_exact_and_sampled_set() -> None:
    row = log_probs([0.1, 0.4, 0.2, 0.3])
    masked = apply_min_p(torch.tensor([row, row, row]), torch.tensor([0.6, 0.0, 1.0]))
    assert torch.isinf(masked).tolist() == [
        [True, False, True, False],  # threshold 0.24
        [False, False, False, False],  # min_p = 0 is off
        [True, False, True, True],  # min_p = 1 keeps the top token
    ]
    assert sampled_set(row, min_p=0.6) == {1, 3}
    # min-p applies after temperature: at T=2 the probs flatten to ratios 0.5, 1, 0.71, 0.87 of the top.
    assert sampled_set(row, min_p=0.6, temperature=2.0) == {1, 2, 3}


def test_sampling_frequencies_follow_softmax_with_temperature() -> None:
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    logits = probs.log() * 2.0  # temperature 2 recovers probs
    num_samples = 20000
    reqs = [make_request(f"r{i}", temperature=2.0) for i in range(num_samples)]
    tokens = Sampler(seed=3)(logits.repeat(num_samples, 1), reqs).token_ids
    freq = torch.bincount(tokens, minlength=4).float() / num_samples
    assert torch.allclose(freq, probs, atol=0.015), freq


def test_exponential_race_never_picks_zero_probability() -> None:
    probs = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.0, 0.5]])
    noise = torch.tensor([[0.0, 5.0, 0.0], [1.0, 0.0, 2.0]])  # exact zeros in the noise
    assert exponential_race(probs, noise).tolist() == [1, 0]


# ---- penalties ---------------------------------------------------------------------------------


def test_token_stats_counts_output_and_marks_prompt() -> None:
    vocab = 6
    # row 0: output [2, 2, 5] then prompt [1, 2]; row 1: output [0]; row 2: empty (padding only)
    ids = torch.tensor([[2, 2, 5, 1, 2], [0, vocab, vocab, vocab, vocab], [vocab] * 5])
    counts, seen = token_stats(ids, torch.tensor([3, 1, 4]), vocab)
    assert counts.tolist() == [[0, 0, 2, 0, 0, 1], [1, 0, 0, 0, 0, 0], [0] * 6]
    assert seen.tolist() == [[False, True, True, False, False, True], [True] + [False] * 5, [False] * 6]


def test_apply_penalties_matches_definitions() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0, 3.0]])
    counts = torch.tensor([[2.0, 1.0, 0.0, 0.0, 0.0]])
    seen = torch.tensor([[True, True, True, False, False]])  # token 2 is only in the prompt
    out = apply_penalties(
        logits, counts, seen, torch.tensor([2.0]), torch.tensor([0.5]), torch.tensor([0.25])
    )
    expected = [
        2.0 / 2 - 0.25 * 2 - 0.5,  # positive: divided; then frequency * count + presence
        -2.0 * 2 - 0.25 * 1 - 0.5,  # negative: multiplied
        1.0 / 2,  # prompt-only token: repetition only
        -1.0,
        3.0,
    ]  # unseen tokens are untouched
    assert out.tolist() == [expected]
    neutral = apply_penalties(
        logits, counts, seen, torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([0.0])
    )
    assert torch.equal(neutral, logits)


def test_penalties_end_to_end_change_greedy_choice() -> None:
    logits = torch.tensor([[3.0, 2.9, 0.0, 0.0], [3.0, 2.9, 0.0, 0.0], [3.0, 2.9, 0.0, 0.0]])
    reqs = [
        make_request("rep", prompt=[0], temperature=0.0, repetition_penalty=1.2),  # prompt counts
        make_request("pres", prompt=[0], output=[0], temperature=0.0, presence_penalty=0.2),
        make_request("plain", prompt=[0], output=[0], temperature=0.0),
    ]
    assert Sampler()(logits, reqs).token_ids.tolist() == [1, 1, 0]
    # presence/frequency look at the output only: a prompt-only token is not penalized
    prompt_only = make_request("p", prompt=[0], temperature=0.0, frequency_penalty=2.0)
    assert Sampler()(logits[:1], [prompt_only]).token_ids.tolist() == [0]


# ---- seeds ---------------------------------------------------------------------------------------


def run_steps(
    sampler: Sampler, target: Request, others: list[Request], row: int, num_steps: int = 8
) -> list[int]:
    logits = torch.randn(num_steps, 64, generator=torch.Generator().manual_seed(7))
    tokens = []
    for step in range(num_steps):
        batch = others[:row] + [target] + others[row:]
        batch_logits = (
            logits[step].repeat(len(batch), 1)
            + torch.randn(len(batch), 64) * (torch.arange(len(batch)) != row)[:, None]
        )  # other rows get different logits
        tokens.append(sampler(batch_logits, batch).token_ids[row].item())
    return tokens


def test_seed_is_deterministic_whatever_the_batch() -> None:
    def target() -> Request:
        return make_request("t", seed=1234, temperature=1.5, top_p=0.95)

    alone = run_steps(Sampler(), target(), [], row=0)
    others = [
        make_request("a", temperature=1.0),
        make_request("b", seed=99, temperature=0.8),
        make_request("c", temperature=0.0),
    ]
    crowded = run_steps(Sampler(), target(), others, row=2)
    assert alone == crowded
    other_seed = run_steps(Sampler(), make_request("t", seed=4321, temperature=1.5, top_p=0.95), [], row=0)
    assert other_seed != alone


def test_forget_restarts_the_seeded_stream() -> None:
    sampler = Sampler()
    logits = torch.zeros(1, 1000)  # uniform: every draw is visible in the token
    req = make_request("t", seed=5)
    first = [sampler(logits, [req]).token_ids.item() for _ in range(3)]
    assert len(set(first)) > 1  # the generator advances across steps
    sampler.forget("t")
    again = [sampler(logits, [req]).token_ids.item() for _ in range(3)]
    assert again == first


def test_unseeded_requests_differ_from_each_other() -> None:
    reqs = [make_request(f"r{i}") for i in range(8)]
    tokens = Sampler(seed=0)(torch.zeros(8, 1000), reqs).token_ids.tolist()
    assert len(set(tokens)) > 1


# ---- logprobs -------------------------------------------------------------------------------------


def test_logprobs_are_raw_log_softmax_with_sorted_top() -> None:
    logits = torch.randn(3, 30, generator=torch.Generator().manual_seed(4))
    reqs = [
        make_request("a", logprobs=3, temperature=0.5, repetition_penalty=2.0, output=[1]),
        make_request("b"),
        make_request("c", logprobs=0, temperature=0.0),
    ]
    out = Sampler(seed=0)(logits, reqs)
    expected = logits.log_softmax(dim=-1)
    token_ids = out.token_ids.tolist()
    entries = out.logprobs_list()
    assert entries[1] is None
    assert entries[2] == {
        "token_id": token_ids[2],
        "logprob": pytest.approx(expected[2, token_ids[2]].item()),
        "top": [],
    }
    entry = entries[0]
    assert entry["token_id"] == token_ids[0]
    assert entry["logprob"] == pytest.approx(expected[0, token_ids[0]].item())
    top_values, top_ids = expected[0].topk(3)
    assert [tid for tid, _ in entry["top"]] == top_ids.tolist()
    assert [lp for _, lp in entry["top"]] == pytest.approx(top_values.tolist())
    assert entry["top"][0][1] >= entry["top"][1][1] >= entry["top"][2][1]


def test_no_logprobs_when_nobody_asks() -> None:
    out = Sampler()(torch.randn(2, 10), [make_request("a"), make_request("b", temperature=0.0)])
    assert out.logprobs is None
    assert out.logprobs_list() == [None, None]


# ---- GPU: the hot path must not sync ------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_no_host_sync_on_cuda() -> None:
    """Every feature at once under CUDA's sync debug mode, which raises on any blocking call."""
    logits = torch.randn(5, 32000, device="cuda", dtype=torch.bfloat16)
    reqs = [
        make_request("s", seed=7, temperature=0.8, top_k=50, top_p=0.9, logprobs=5),
        make_request(
            "p",
            output=[1, 2, 2],
            temperature=1.0,
            min_p=0.05,
            repetition_penalty=1.2,
            presence_penalty=0.5,
            frequency_penalty=0.5,
        ),
        make_request("g", temperature=0.0),
        make_request("g2", temperature=0.0, repetition_penalty=1.5, prompt=[3, 4]),
        make_request("u", temperature=0.7),
    ]
    sampler = Sampler(seed=0)
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = sampler(logits, reqs)
        greedy = Sampler()(logits, [make_request(f"g{i}", temperature=0.0) for i in range(5)])
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert out.token_ids.device.type == "cuda" and greedy.token_ids.device.type == "cuda"
    assert out.token_ids[2].item() == logits[2].float().argmax().item()
    alone = Sampler(seed=1)(logits[:1], [make_request("s", seed=7, temperature=0.8, top_k=50, top_p=0.9)])
    assert alone.token_ids.item() == out.token_ids[0].item()  # seeded row: same token on its own
    assert len(out.logprobs_list()[0]["top"]) == 5
