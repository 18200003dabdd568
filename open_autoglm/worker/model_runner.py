"""Turns a scheduled batch into model inputs, runs the model, returns logits of sampling rows.

The whole step is one flat batch of T tokens (see attention/base.py for the layout). Only the
rows whose request reaches its last token this step are sampled; a partial prefill chunk just
fills the KV cache.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from open_autoglm.attention.base import AttentionMetadata
from open_autoglm.engine.request import Request
from open_autoglm.engine.scheduler import SchedulerOutput
from open_autoglm.worker.inputs import BlockTables, HostInputs, Uploader, build_host_inputs
from open_autoglm.worker.kv_cache import KVCacheSpec, allocate_kv_cache, num_blocks_for_budget

logger = logging.getLogger(__name__)


@dataclass
class StepInputs:
    input_ids: torch.Tensor      # [T]
    positions: torch.Tensor      # [T]
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # [S] rows of the hidden states to turn into logits
    sampling_requests: list[Request]


class ModelRunner:
    def __init__(self, model: torch.nn.Module, hf_config, device: torch.device, dtype: torch.dtype,
                 block_size: int) -> None:
        self.model = model
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.kv_spec = KVCacheSpec.from_hf_config(hf_config, block_size, dtype)
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.num_blocks = 0
        self.graphs = None  # DecodeGraphs once captured (CUDA only)
        self.warmup_seconds = self.kv_alloc_seconds = 0.0
        self.uploader = Uploader(device)  # pinned staging + async copies on CUDA
        self.block_tables = BlockTables()  # int32 block tables kept across steps

    # -- start-up -------------------------------------------------------------------------------
    def init_kv_cache(self, num_blocks: int | None, gpu_memory_utilization: float, cpu_bytes: int,
                      warmup_tokens: int) -> int:
        """Warm up with a forward of `warmup_tokens` tokens (no cache), then size and allocate."""
        t0 = time.perf_counter()
        self._warmup(warmup_tokens)
        t1 = time.perf_counter()
        if num_blocks is None:
            num_blocks = num_blocks_for_budget(self.kv_spec, self.device, gpu_memory_utilization, cpu_bytes)
        self.kv_caches = allocate_kv_cache(self.kv_spec, num_blocks, self.device)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.num_blocks = num_blocks
        # Start-up accounting (bench startup): the warm-up includes Triton JIT compiles on a cold cache.
        self.warmup_seconds, self.kv_alloc_seconds = t1 - t0, time.perf_counter() - t1
        logger.info("KV cache: %d blocks x %d tokens (%.1f MiB): warm-up %.2fs, allocation %.2fs", num_blocks,
                    self.block_size, num_blocks * self.kv_spec.bytes_per_block / 2**20, self.warmup_seconds,
                    self.kv_alloc_seconds)
        return num_blocks

    @torch.inference_mode()
    def _warmup(self, num_tokens: int) -> None:
        """One prefill of `num_tokens` tokens against a scratch one-sequence cache, to find the
        activation peak before sizing the KV cache."""
        blocks = -(-num_tokens // self.block_size)
        scratch = allocate_kv_cache(self.kv_spec, blocks, self.device)
        ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        pos = torch.arange(num_tokens, device=self.device)
        meta = AttentionMetadata(
            slot_mapping=pos.clone(),
            query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32, device=self.device),
            seq_lens=torch.tensor([num_tokens], dtype=torch.int32, device=self.device),
            block_tables=torch.arange(blocks, dtype=torch.int32, device=self.device)[None],
            query_lens_cpu=[num_tokens], seq_lens_cpu=[num_tokens], max_query_len=num_tokens, max_seq_len=num_tokens,
        )
        hidden = self.model(ids, pos, scratch, meta)
        self.model.compute_logits(hidden[-1:])
        del scratch, hidden
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def capture_cuda_graphs(self, max_batch: int, max_model_len: int) -> float:
        """Capture decode graphs for batches up to `max_batch`; returns the capture seconds."""
        from open_autoglm.worker.cuda_graphs import DecodeGraphs

        max_blocks = -(-max_model_len // self.block_size)
        self.graphs = DecodeGraphs(self.model, self.kv_caches, max_batch, max_blocks, max_model_len, self.device)
        return self.graphs.capture()

    # -- the step -------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, batch: SchedulerOutput, input_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, list[Request]]:
        """Float32 logits [S, V] of the rows that sample, and their requests. input_ids: a decode
        batch's ids already on the device (the previous step's samples, engine/lookahead.py)."""
        host = build_host_inputs(batch, self.block_size, self.block_tables)
        if self.graphs is not None and self.graphs.can_run(host):
            return self.graphs.run(host, input_ids), host.sampling
        inputs = self._to_device(host)
        if input_ids is not None:
            inputs.input_ids.copy_(input_ids)
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta)
        return self.model.compute_logits(hidden[inputs.logits_indices]).float(), host.sampling

    def prepare(self, batch: SchedulerOutput) -> StepInputs:
        """Host-side lists -> two uploads (see worker/inputs.py)."""
        return self._to_device(build_host_inputs(batch, self.block_size, self.block_tables))

    def _to_device(self, host: HostInputs) -> StepInputs:
        input_ids, positions, logits_indices, meta = self.uploader.step_tensors(host)
        return StepInputs(input_ids=input_ids, positions=positions, meta=meta, logits_indices=logits_indices,
                          sampling_requests=host.sampling)
