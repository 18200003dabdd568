"""Host <-> GPU copies through the page-locked bounce buffer (worker/transfer.py) against copy_.

Sizes around the chunk size (one chunk, several, an odd tail), dtype casts in both directions,
strided targets, bool and empty tensors; and a live update whose values come from a memory-mapped
file; and live updates on a CUDA engine. `gpu`-marked: skipped on CPU, run on the lent GPU.
"""

from __future__ import annotations

import pytest
import torch

from open_autoglm.worker import transfer

pytestmark = pytest.mark.gpu

CHUNK = transfer.CHUNK_BYTES
SIZES = [0, 1, 4097, CHUNK // 2, CHUNK // 2 + 3, CHUNK, 3 * CHUNK // 2 + 5]  # in bf16 elements


@pytest.fixture(scope="module")
def dev():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    transfer.prepare(torch.device("cuda"))
    return torch.device("cuda")


@pytest.mark.parametrize("n", SIZES)
def test_host_to_device_and_back_is_exact(dev, n):
    g = torch.Generator().manual_seed(n)
    host = torch.randn(n, generator=g).to(torch.bfloat16)
    on_gpu = torch.empty(n, dtype=torch.bfloat16, device=dev)
    transfer.copy(on_gpu, host)
    assert torch.equal(on_gpu.cpu(), host)
    back = torch.empty_like(host)
    transfer.copy(back, on_gpu)
    assert torch.equal(back, host)
    assert torch.equal(transfer.to_host(on_gpu), host)


def test_casts_and_strided_targets(dev):
    g = torch.Generator().manual_seed(1)
    src32 = torch.randn(300, 257, generator=g)
    live = torch.zeros(600, 257, dtype=torch.bfloat16, device=dev)
    transfer.copy(live[::2], src32)  # strided bf16 target from an fp32 host tensor
    assert torch.equal(live[::2].cpu(), src32.to(torch.bfloat16)) and not live[1::2].any()
    host_t = torch.empty(257, 300, dtype=torch.float32).t()  # strided host target, cast up
    transfer.copy(host_t, live[::2])
    assert torch.equal(host_t, src32.to(torch.bfloat16).float())
    flags = torch.rand(1000, generator=g) > 0.5
    flags_gpu = torch.empty(1000, dtype=torch.bool, device=dev)
    transfer.copy(flags_gpu, flags)
    assert torch.equal(flags_gpu.cpu(), flags)


def test_pinned_and_same_device_copies_still_work(dev):
    src = torch.arange(10_000, dtype=torch.float32).pin_memory()
    dst = torch.empty(10_000, device=dev)
    transfer.copy(dst, src)
    other = torch.empty_like(dst)
    transfer.copy(other, dst)
    assert torch.equal(other.cpu(), src)


def test_on_a_side_stream_the_result_is_complete_on_return(dev):
    src = torch.randn(3 * CHUNK // 4 + 11)  # fp32: several chunks
    dst = torch.empty_like(src, device=dev)
    stream = torch.cuda.Stream(dev)
    with torch.cuda.stream(stream):
        transfer.copy(dst, src)
        back = transfer.to_host(dst)
    assert torch.equal(back, src)


def test_copy_from_a_memory_mapped_safetensors_file(dev, tmp_path):
    from safetensors.torch import save_file

    from open_autoglm.registry.safetensors_io import MappedFile
    from open_autoglm.worker.updates import tensor_from_bytes

    w = torch.randn(513, 1031).to(torch.bfloat16)
    save_file({"w": w}, str(tmp_path / "m.safetensors"))
    out = torch.empty(513, 1031, dtype=torch.bfloat16, device=dev)
    with MappedFile(tmp_path / "m.safetensors") as mf:
        info = mf.header.tensors["w"]
        view = mf.view(info)
        transfer.copy(out, tensor_from_bytes(view, info.dtype, info.shape))
        del view
    assert torch.equal(out.cpu(), w)


def test_live_updates_on_the_gpu_match_fresh_engines(dev, tiny_checkpoint, tmp_path):
    """Full swap, delta and rollback on a CUDA engine (device staging, snapshots kept on the GPU
    when there is room): greedy outputs equal an engine started on each target."""
    from test_updates_helpers import PROMPTS, build_registry

    from open_autoglm.engine.llm_engine import LLMEngine
    from open_autoglm.engine.updates import UpdateSource
    from open_autoglm.sampling_params import SamplingParams

    reg = build_registry(tmp_path, tiny_checkpoint("llama"))
    options = dict(device="cuda", dtype="float32", num_kv_blocks=64, max_num_seqs=8)
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)

    def run(engine):
        ids = [engine.add_request(p, greedy) for p in PROMPTS]
        done = {}
        while len(done) < len(ids):
            done.update({o.request_id: o.output_token_ids for o in engine.step() if o.finished})
        return [done[i] for i in ids]

    fresh = {v: run(LLMEngine(model=str(reg.resolve("tiny", v)), **options)) for v in ("v1", "v2", "v3")}
    engine = LLMEngine(model=str(reg.resolve("tiny", "v1")), **options)
    assert run(engine) == fresh["v1"]
    src = dict(registry=str(reg.root), model="tiny")
    full = engine.update_weights(UpdateSource(version="v3", **src))
    assert full.staging == "device" and run(engine) == fresh["v3"]
    assert all(t.is_cuda for t in engine.updates.history[-1].patch.values)  # snapshot kept on the GPU
    engine.rollback()
    assert run(engine) == fresh["v1"]
    delta = engine.update_weights(UpdateSource(version="v2", **src), mode="delta")
    assert delta.bytes_moved < delta.model_bytes and run(engine) == fresh["v2"]
    engine.rollback()
    assert run(engine) == fresh["v1"]
