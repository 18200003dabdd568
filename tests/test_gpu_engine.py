"""The GPU fast path (Triton attention + fused Triton ops + CUDA graphs) against the references.

    reference                      | fast path checked against it
    transformers (CPU, fp32)       | greedy tokens of the whole engine, graphs on
    "torch" backend (GPU, fp32)    | greedy tokens, every architecture, prefix hits, chunked prefill,
                                   | and batch 1 (one-token steps: fused GEMVs)
    eager forward, same inputs     | CUDA-graph replay logits (bf16, padded bucket) and tokens (fp32)
    cuBLAS one-token step          | the fused-GEMV one-token step's logits (bf16)
    a fresh reference engine       | graphs after weights are copied in place (they must follow)
    plain PyTorch layers           | each fused op (RMSNorm+residual, rotary(+KV write), SiLU·mul,
                                   | GEMV with norm / SiLU prologues), bf16

All `gpu`-marked: skipped on CPU, run on the lent GPU (`pytest -m gpu tests/test_gpu_engine.py`).
"""

from __future__ import annotations

import pytest
import torch
from conftest import hf_greedy, write_tiny_checkpoint

from open_autoglm.llm import LLM
from open_autoglm.sampling_params import SamplingParams

pytestmark = pytest.mark.gpu

ARCHS = ["llama", "llama3-tied", "qwen2", "glm4"]
NEW_TOKENS = 24
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
# Small graph buckets (1, 2, 4, 8) keep capture short; 10 prompts still mix graph and eager steps.
# A fixed KV cache: sized from free memory, the first engine would take the GPU from the others
# (pytest -n runs several test processes on one GPU).
FAST = dict(device="cuda", attention_backend="triton", cuda_graphs=True, max_num_seqs=8, num_kv_blocks=512)
REFERENCE = dict(device="cuda", attention_backend="torch", cuda_graphs=False, max_num_seqs=8, num_kv_blocks=512)


def mixed_prompts(seed: int = 0) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    prompts = [[rng.randrange(6, 300) for _ in range(rng.randrange(3, 60))] for _ in range(8)]
    prompts.append(prompts[1][:40] + [7, 8, 9])  # shares a 2-block prefix with prompt 1: a cache hit
    prompts.append(prompts[0][:5] + prompts[2])
    return prompts


def greedy_tokens(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    return [o.output_token_ids for o in llm.generate(prompts, GREEDY)]


def count_graph_replays(llm: LLM) -> dict:
    """Wrap the runner's graph entry point so a test can prove the graphs ran."""
    graphs = llm.engine.runner.graphs
    assert graphs is not None, "no CUDA graphs were captured"
    calls = {"n": 0}
    run = graphs.run

    def counted(host, input_ids=None):
        calls["n"] += 1
        return run(host, input_ids)

    graphs.run = counted
    return calls


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("arch", ARCHS)
def test_fast_path_fp32_tokens_match_reference_backend(arch, tiny_checkpoint):
    path = str(tiny_checkpoint(arch))
    expected = greedy_tokens(LLM(model=path, dtype="float32", **REFERENCE), mixed_prompts())
    for mode in (dict(), dict(max_num_batched_tokens=16)):  # whole prompts; chunks riding with decodes
        fast = LLM(model=path, dtype="float32", **FAST, **mode)
        replays = count_graph_replays(fast)
        assert greedy_tokens(fast, mixed_prompts()) == expected, mode
        assert replays["n"] > 0
        again = greedy_tokens(fast, mixed_prompts())  # served from the prefix cache this time
        assert again == expected and fast.engine.stats()["prefix_cache_hits"] > 0


def test_fast_path_matches_transformers(tiny_checkpoint):
    path = tiny_checkpoint("qwen2")
    fast = LLM(model=str(path), dtype="float32", **FAST)
    assert greedy_tokens(fast, mixed_prompts()) == hf_greedy(path, mixed_prompts(), NEW_TOKENS)


def _decode_batch(llm: LLM, prompts: list[list[int]]):
    """Run the prompts' prefill, then schedule one decode-only step; returns its host inputs."""
    from open_autoglm.worker.inputs import build_host_inputs

    engine = llm.engine
    for prompt in prompts:
        engine.add_request(prompt, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    engine.step()  # all prompts fit one prefill step
    batch = engine.scheduler.schedule()
    host = build_host_inputs(batch, engine.runner.block_size, engine.runner.block_tables)
    assert host.is_decode_only and host.num_seqs == len(prompts)
    return host


@torch.inference_mode()
def _eager_logits(runner, host) -> torch.Tensor:
    inputs = runner._to_device(host)
    hidden = runner.model(inputs.input_ids, inputs.positions, runner.kv_caches, inputs.meta)
    return runner.model.compute_logits(hidden[inputs.logits_indices]).float()


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_graph_replay_matches_eager(dtype, tiny_checkpoint):
    llm = LLM(model=str(tiny_checkpoint("llama")), dtype=dtype, **FAST)
    runner = llm.engine.runner
    host = _decode_batch(llm, mixed_prompts()[:3])  # 3 rows in the 4-row graph: one padding row
    graph = runner.graphs.run(host).clone()
    eager = _eager_logits(runner, host)  # rewrites the same K/V into the same slots
    if dtype == "float32":
        assert torch.equal(graph.argmax(-1), eager.argmax(-1))
        assert rel_err(graph, eager) < 1e-5
    else:
        assert rel_err(graph, eager) < 1e-2
    assert torch.isfinite(graph).all()


def test_graphs_follow_in_place_weight_update(tmp_path):
    from open_autoglm.models.loader import iter_safetensors
    from open_autoglm.worker.weights import load_weights

    old, new = write_tiny_checkpoint(tmp_path / "old", "qwen2", seed=0), write_tiny_checkpoint(tmp_path / "new", "qwen2", seed=1)
    prompts = mixed_prompts(1)
    fast = LLM(model=str(old), dtype="float32", **FAST)
    before = greedy_tokens(fast, prompts)
    params = {name: p.data_ptr() for name, p in fast.engine.model.named_parameters()}
    load_weights(fast.engine.model, iter_safetensors(new))  # copy_ into the same storage
    assert params == {name: p.data_ptr() for name, p in fast.engine.model.named_parameters()}
    fast.engine.block_manager.reset_prefix_cache()  # cached KV was computed under the old weights
    replays = count_graph_replays(fast)
    after = greedy_tokens(fast, prompts)
    expected = greedy_tokens(LLM(model=str(new), dtype="float32", **REFERENCE), prompts)
    assert after == expected and after != before and replays["n"] > 0


@pytest.mark.parametrize("interleaved,rotary_dim", [(False, 128), (True, 64)])
def test_fused_ops_match_torch_bf16(interleaved, rotary_dim):
    from open_autoglm.layers.activation import SiluAndMul
    from open_autoglm.layers.norm import RMSNorm
    from open_autoglm.layers.rotary import RotaryEmbedding, default_inv_freq

    torch.manual_seed(0)
    dtype, dev = torch.bfloat16, "cuda"
    ref, fused = RMSNorm(1536, 1e-6).to(dev, dtype), RMSNorm(1536, 1e-6, fused=True).to(dev, dtype)
    with torch.no_grad():
        ref.weight.normal_()
        fused.weight.copy_(ref.weight)
    x, r = torch.randn(37, 1536, device=dev, dtype=dtype), torch.randn(37, 1536, device=dev, dtype=dtype)
    for residual in (r, None):
        (a, sa), (b, sb) = ref.forward_residual(x, residual), fused.forward_residual(x, residual)
        assert torch.equal(sa, sb) and rel_err(b, a) < 1e-2
    gate_up = torch.randn(37, 2 * 8960, device=dev, dtype=dtype)
    assert rel_err(SiluAndMul(True)(gate_up), SiluAndMul()(gate_up)) < 1e-2
    inv = default_inv_freq(rotary_dim, 1e6)
    rope_ref = RotaryEmbedding(128, inv, 4096, interleaved).to(dev)
    rope_fused = RotaryEmbedding(128, inv, 4096, interleaved, fused=True).to(dev)
    qkv = torch.randn(37, 16 * 128, device=dev, dtype=dtype)
    pos = torch.randint(0, 4096, (37,), device=dev)

    def split(t):  # Qwen2.5 layout: 12 q heads, 2 k heads, 2 v heads; strided views of one tensor
        q, k, _ = t.split([12 * 128, 256, 256], dim=-1)
        return q.view(37, 12, 128), k.view(37, 2, 128)

    qa, ka = rope_ref(pos, *split(qkv.clone()))
    moved = qkv.clone()
    qb, kb = rope_fused(pos, *split(moved))
    assert rel_err(qb, qa) < 1e-2 and rel_err(kb, ka) < 1e-2
    assert torch.equal(moved[:, 14 * 128:], qkv[:, 14 * 128:])  # v untouched


@pytest.mark.parametrize("arch", ["qwen2", "llama3-tied", "glm4"])
def test_batch_one_decode_matches_reference(arch, tiny_checkpoint):
    """One request at a time: every decode step is a one-token step (graph bucket 1, fused GEMVs)."""
    path = str(tiny_checkpoint(arch))
    prompts = mixed_prompts(2)[:3]
    reference = LLM(model=path, dtype="float32", **REFERENCE)
    fast = LLM(model=path, dtype="float32", **FAST)
    replays = count_graph_replays(fast)
    for prompt in prompts:
        assert greedy_tokens(fast, [prompt]) == greedy_tokens(reference, [prompt])
    assert replays["n"] >= len(prompts) * (NEW_TOKENS - 1)


def test_one_token_gemv_matches_cublas(tiny_checkpoint):
    llm = LLM(model=str(tiny_checkpoint("qwen2")), dtype="bfloat16", **FAST)
    runner, model = llm.engine.runner, llm.engine.model
    host = _decode_batch(llm, mixed_prompts()[:1])
    assert model.decode_gemv
    fused = _eager_logits(runner, host)
    model.set_decode_gemv(False)
    plain = _eager_logits(runner, host)
    assert rel_err(fused, plain) < 1e-2 and torch.isfinite(fused).all()


@pytest.mark.parametrize("prologue", ["plain", "norm", "silu"])
def test_gemv_matches_torch_bf16(prologue):
    import torch.nn.functional as F

    from open_autoglm.layers.activation import SiluAndMul
    from open_autoglm.layers.norm import RMSNorm
    from open_autoglm.layers.triton_gemv import gemv

    torch.manual_seed(1)
    dev, dtype = "cuda", torch.bfloat16
    n, k = 1037, 1536  # N not a multiple of the row block
    w, b = torch.randn(n, k, device=dev, dtype=dtype) / 40, torch.randn(n, device=dev, dtype=dtype)
    x, r = torch.randn(1, k, device=dev, dtype=dtype), torch.randn(1, k, device=dev, dtype=dtype)
    if prologue == "plain":
        y, _ = gemv(x, w, b)
        assert rel_err(y, F.linear(x, w, b)) < 1e-2
    elif prologue == "norm":
        norm = RMSNorm(k, 1e-6).to(dev, dtype)
        with torch.no_grad():
            norm.weight.normal_()
        for residual in (r, None):
            xn, s = norm.forward_residual(x, residual)
            y, s2 = gemv(x, w, b, "norm", residual, norm.weight, 1e-6)
            assert torch.equal(s2, s) and rel_err(y, F.linear(xn, w, b)) < 1e-2
    else:
        gate_up = torch.randn(1, 2 * k, device=dev, dtype=dtype)
        y, _ = gemv(gate_up, w, prologue="silu")
        assert rel_err(y, F.linear(SiluAndMul()(gate_up), w)) < 1e-2


def test_rotary_writes_kv_cache():
    from open_autoglm.layers.rotary import RotaryEmbedding, default_inv_freq

    dev, dtype = "cuda", torch.bfloat16
    rope = RotaryEmbedding(128, default_inv_freq(64, 1e4), 256, interleaved=True, fused=True).to(dev)
    qkv = torch.randn(5, (4 + 2 * 2) * 128, device=dev, dtype=dtype)
    q, k, v = (t.view(5, -1, 128) for t in qkv.split([512, 256, 256], dim=-1))
    k_cache = torch.full((4, 16, 2, 128), float("nan"), device=dev, dtype=dtype)
    v_cache = k_cache.clone()
    slots = torch.tensor([3, 17, -1, 40, 63], device=dev)
    rope.rotate_and_cache(torch.arange(5, device=dev), q, k, v, k_cache, v_cache, slots)
    flat_k, flat_v = k_cache.view(64, 2, 128), v_cache.view(64, 2, 128)
    for row, slot in enumerate(slots.tolist()):
        if slot >= 0:
            assert torch.equal(flat_k[slot], k[row]) and torch.equal(flat_v[slot], v[row])
    assert torch.isnan(flat_k).any(dim=(1, 2)).sum() == 64 - 4  # nothing else written (slot -1 skipped)


@pytest.mark.parametrize("num_prompts", [1, 3])
def test_pdl_launches_match_plain_launches(num_prompts, monkeypatch, tiny_checkpoint):
    """Programmatic dependent launch (layers/pdl.py) changes when kernels start, never what they
    compute: graph and eager logits are bit-identical with it on and off (batch 1 runs the fused
    GEMVs, batch 3 the cuBLAS path; both chain PDL kernels)."""
    from open_autoglm.layers.pdl import pdl_enabled

    if not pdl_enabled(torch.device("cuda")):
        pytest.skip("PDL needs compute capability >= 9.0")
    path = str(tiny_checkpoint("qwen2"))

    def logits(pdl: str) -> tuple[torch.Tensor, torch.Tensor]:
        monkeypatch.setenv("AUTOGLM_PDL", pdl)
        llm = LLM(model=path, dtype="bfloat16", **FAST)  # graphs captured under this setting
        host = _decode_batch(llm, mixed_prompts(3)[:num_prompts])
        return llm.engine.runner.graphs.run(host).clone(), _eager_logits(llm.engine.runner, host)

    (graph_on, eager_on), (graph_off, eager_off) = logits("1"), logits("0")
    assert torch.equal(graph_on, graph_off) and torch.equal(eager_on, eager_off)
    assert torch.isfinite(graph_on).all()


def test_overlapped_steps_match_synchronous(tiny_checkpoint):
    """On CUDA decode steps are launched ahead by default (engine/lookahead.py): batch-1 graphs,
    padded buckets, requests ending at different steps and on a stop token give the synchronous
    engine's tokens, and every KV block comes back."""
    path = str(tiny_checkpoint("qwen2"))
    prompts = mixed_prompts(5)
    sync = LLM(model=path, dtype="float32", async_scheduling="off", **FAST)
    reference = greedy_tokens(sync, prompts)
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (1, 3, 24, 24, 17, 24, 9, 24, 24, 2)]
    params[5] = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop_token_ids=[reference[5][7]])
    overlapped = LLM(model=path, dtype="float32", **FAST)
    assert overlapped.engine.overlap and not sync.engine.overlap
    for llm in (sync, overlapped):
        outs = llm.generate(prompts, params)
        assert [o.output_token_ids for o in outs] == [r[:len(o.output_token_ids)] for o, r in zip(outs, reference)]
        stop_at = reference[5].index(reference[5][7]) + 1  # the stop token's first occurrence, kept in the output
        assert [len(o.output_token_ids) for o in outs] == [1, 3, 24, 24, 17, stop_at, 9, 24, 24, 2]
        bm = llm.engine.block_manager
        assert bm.num_free_blocks == bm.num_blocks
    one = [SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)]
    assert overlapped.generate([prompts[2]], one)[0].output_token_ids == reference[2]  # batch 1 alone
