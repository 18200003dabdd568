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
        self.pin = device.type == "cuda"  # stage host->device copies in pinned memory

    # -- start-up -------------------------------------------------------------------------------
    def init_kv_cache(self, num_blocks: int | None, gpu_memory_utilization: float, cpu_bytes: int,
                      warmup_tokens: int) -> int:
        """Warm up with a forward of `warmup_tokens` tokens (no cache), then size and allocate."""
        t0 = time.perf_counter()
        self._warmup(warmup_tokens)
        if num_blocks is None:
            num_blocks = num_blocks_for_budget(self.kv_spec, self.device, gpu_memory_utilization, cpu_bytes)
        self.kv_caches = allocate_kv_cache(self.kv_spec, num_blocks, self.device)
        self.num_blocks = num_blocks
        logger.info("KV cache: %d blocks x %d tokens (%.1f MiB) in %.2fs", num_blocks, self.block_size,
                    num_blocks * self.kv_spec.bytes_per_block / 2**20, time.perf_counter() - t0)
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
    def execute(self, batch: SchedulerOutput) -> tuple[torch.Tensor, list[Request]]:
        inputs = self.prepare(batch)
        if self.graphs is not None and self.graphs.can_run(inputs.meta):
            logits = self.graphs.run(inputs.input_ids, inputs.positions, inputs.meta)
        else:
            hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta)
            logits = self.model.compute_logits(hidden[inputs.logits_indices])
        return logits.float(), inputs.sampling_requests

    def prepare(self, batch: SchedulerOutput) -> StepInputs:
        """Host-side lists -> one upload per tensor."""
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start = [0]
        seq_lens: list[int] = []
        logits_indices: list[int] = []
        sampling: list[Request] = []
        bs = self.block_size
        for request, num_new in batch.scheduled:
            start = request.num_computed_tokens
            end = start + num_new
            token_ids = request.all_token_ids
            input_ids.extend(token_ids[start:end])
            positions.extend(range(start, end))
            blocks = request.block_ids
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(start, end))
            query_start.append(query_start[-1] + num_new)
            seq_lens.append(end)
            if end == request.num_tokens:  # reaches its newest token: sample the next one
                logits_indices.append(query_start[-1] - 1)
                sampling.append(request)
        max_blocks = max(len(r.block_ids) for r, _ in batch.scheduled)
        tables = [r.block_ids + [0] * (max_blocks - len(r.block_ids)) for r, _ in batch.scheduled]
        query_lens = [b - a for a, b in zip(query_start, query_start[1:])]
        up = self._upload
        meta = AttentionMetadata(
            slot_mapping=up(slots, torch.long), query_start_loc=up(query_start, torch.int32),
            seq_lens=up(seq_lens, torch.int32), block_tables=up(tables, torch.int32),
            query_lens_cpu=query_lens, seq_lens_cpu=seq_lens,
            max_query_len=max(query_lens), max_seq_len=max(seq_lens),
        )
        return StepInputs(
            input_ids=up(input_ids, torch.long), positions=up(positions, torch.long), meta=meta,
            logits_indices=up(logits_indices, torch.long), sampling_requests=sampling,
        )

    def _upload(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        """Host list -> device tensor without blocking the host (pinned staging on CUDA)."""
        cpu = torch.tensor(values, dtype=dtype, pin_memory=self.pin)
        return cpu.to(self.device, non_blocking=True) if self.pin else cpu
