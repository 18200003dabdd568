"""Host side of a step's inputs: scheduled requests -> a few numpy arrays, then few uploads.

At batch 256 this runs every step, so it is written for per-request cost (~1 µs a decode row):
no `request.all_token_ids` (a fresh prompt + output list per call), slots per block rather than
per token for long chunks, block tables kept across steps (BlockTables), two host->device copies:

    int64 buffer  | input_ids [T] | positions [T] | slot_mapping [T] | logits_indices [S]
    int32 buffer  | query_start_loc [B+1] | seq_lens [B] | block_tables [B, W] (0-padded)

T = tokens this step, B = requests, S = requests that sample (reach their newest token),
W = the longest block table in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from open_autoglm.attention.base import AttentionMetadata
from open_autoglm.engine.request import Request
from open_autoglm.engine.scheduler import SchedulerOutput


@dataclass
class HostInputs:
    input_ids: list[int]
    positions: list[int]
    slots: list[int]
    query_start: list[int]
    seq_lens: list[int]
    logits_indices: list[int]
    block_tables: np.ndarray  # [B, W] int32
    sampling: list[Request]
    max_query_len: int

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1

    @property
    def samples_every_row(self) -> bool:
        return len(self.logits_indices) == len(self.seq_lens)


def token_slice(request: Request, start: int, end: int) -> list[int]:
    """all_token_ids[start:end] without building all_token_ids."""
    prompt = request.prompt_token_ids
    n = len(prompt)
    if end <= n:
        return prompt[start:end]
    if start >= n:
        return request.output_token_ids[start - n:end - n]
    return prompt[start:] + request.output_token_ids[:end - n]


def chunk_slots(blocks: list[int], start: int, end: int, block_size: int) -> list[int]:
    """Cache slots of positions [start, end): one range per block touched."""
    slots: list[int] = []
    pos = start
    while pos < end:
        block_end = min((pos // block_size + 1) * block_size, end)
        base = blocks[pos // block_size] * block_size - (pos // block_size) * block_size
        slots.extend(range(base + pos, base + block_end))
        pos = block_end
    return slots


class BlockTables:
    """Block tables kept across steps, so a step converts only new block ids to int32.

    Converting every request's whole list each step costs ~55 ns per id on a small CPU (0.6 ms at
    256 requests x 600 tokens); a decode step adds one block per request every block_size steps.
    Rows are gathered for the batch with one numpy take.

    Relies on the block manager's contract: a request's `block_ids` list only grows (append /
    extend) until it is replaced by a new list (`free` assigns []). So while the list object is
    the one a row was copied from and it is at least as long, the copied prefix is still right;
    anything else rewrites the row.
    """

    def __init__(self, num_rows: int = 64, width: int = 64) -> None:
        self.table = np.zeros((num_rows, width), dtype=np.int32)
        self.rows: dict[str, list] = {}  # request_id -> [row, block_ids list, num copied, step last used]
        self.free_rows = list(range(num_rows))
        self.step = 0

    def gather(self, requests: list[Request]) -> np.ndarray:
        """[B, W] int32, row b = requests[b].block_ids then zeros (W = the longest list)."""
        self.step += 1
        step, entries = self.step, self.rows
        rows, width = [], 0
        for request in requests:
            blocks = request.block_ids
            n = len(blocks)
            entry = entries.get(request.request_id)
            if entry is None or entry[1] is not blocks or entry[2] > n:
                entry = self._claim(request.request_id, entry)
                entry[1] = blocks
            if n > entry[2]:  # new blocks since the last copy (a decode row: once every block_size steps)
                if n > self.table.shape[1]:
                    self._grow(self.table.shape[0], max(n, 2 * self.table.shape[1]))
                self.table[entry[0], entry[2]:n] = blocks[entry[2]:]
                entry[2] = n
            entry[3] = step
            rows.append(entry[0])
            if n > width:
                width = n
        return self.table[rows, :width]  # fancy indexing: a copy, safe to hand out

    def _claim(self, request_id: str, entry: list | None) -> list:
        if entry is not None:  # same request, new list (preempted and re-allocated): rewrite its row
            entry[2] = 0
            return entry
        if not self.free_rows:
            self._evict()
        entry = [self.free_rows.pop(), None, 0, self.step]
        self.rows[request_id] = entry
        return entry

    def _evict(self) -> None:
        """Free the rows of requests not in this step (finished ones linger until then); grow if none."""
        stale = [rid for rid, e in self.rows.items() if e[3] < self.step]
        for rid in stale:
            self.free_rows.append(self.rows.pop(rid)[0])
        if not self.free_rows:
            old = self.table.shape[0]
            self._grow(2 * old, self.table.shape[1])
            self.free_rows.extend(range(old, 2 * old))

    def _grow(self, num_rows: int, width: int) -> None:
        table = np.zeros((num_rows, width), dtype=np.int32)
        table[: self.table.shape[0], : self.table.shape[1]] = self.table
        self.table = table


def build_host_inputs(batch: SchedulerOutput, block_size: int, tables: BlockTables) -> HostInputs:
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    query_start = [0]
    seq_lens: list[int] = []
    logits_indices: list[int] = []
    sampling: list[Request] = []
    requests: list[Request] = []
    total = max_query_len = 0
    for request, num_new in batch.scheduled:
        requests.append(request)
        start = request.num_computed_tokens
        end = start + num_new
        prompt, output = request.prompt_token_ids, request.output_token_ids
        num_prompt = len(prompt)
        if num_new == 1:  # the decode row: no slicing, no ranges
            i = start - num_prompt
            # i == len(output): a step launched ahead (engine/lookahead.py); its id comes from the device
            ids.append(prompt[start] if i < 0 else output[i] if i < len(output) else 0)
            positions.append(start)
            slots.append(request.block_ids[start // block_size] * block_size + start % block_size)
        else:
            ids.extend(token_slice(request, start, end))
            positions.extend(range(start, end))
            slots.extend(chunk_slots(request.block_ids, start, end, block_size))
        total += num_new
        if num_new > max_query_len:
            max_query_len = num_new
        query_start.append(total)
        seq_lens.append(end)
        if end >= num_prompt + len(output):  # reaches its newest token: sample the next one
            logits_indices.append(total - 1)
            sampling.append(request)
    block_tables = tables.gather(requests)
    return HostInputs(ids, positions, slots, query_start, seq_lens, logits_indices, block_tables,
                      sampling, max_query_len)


class Uploader:
    """Host arrays -> device tensors; pinned staging and async copies on CUDA (PyTorch's caching
    host allocator keeps a staging block alive until its copy has run)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pin = device.type == "cuda"

    def host(self, size: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(size, dtype=dtype, pin_memory=self.pin)

    def to_device(self, host: torch.Tensor) -> torch.Tensor:
        return host.to(self.device, non_blocking=True) if self.pin else host

    def step_tensors(self, h: HostInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
        """(input_ids, positions, logits_indices, meta) on the device, from two uploads.

        Every segment starts 16-byte aligned and block tables are 16 wide or a multiple: Triton
        specializes kernels on pointer alignment and on strides % 16, so unaligned segments would
        JIT-compile new variants (~1 s each) in the middle of serving.
        """
        num_tokens, num_seqs, num_sample = len(h.input_ids), h.num_seqs, len(h.logits_indices)
        t = _round_up(num_tokens, 2)  # int64 segment stride: 16 bytes
        buf64 = self.host(3 * t + num_sample, torch.int64)
        a = buf64.numpy()
        a[:num_tokens] = h.input_ids
        a[t:t + num_tokens] = h.positions
        a[2 * t:2 * t + num_tokens] = h.slots
        a[3 * t:] = h.logits_indices
        tables = h.block_tables
        width = _round_up(tables.shape[1], 16)
        q, s = _round_up(num_seqs + 1, 4), _round_up(num_seqs, 4)  # int32 segments: 16 bytes
        buf32 = self.host(q + s + num_seqs * width, torch.int32)
        b = buf32.numpy()
        b[:num_seqs + 1] = h.query_start
        b[q:q + num_seqs] = h.seq_lens
        padded = b[q + s:].reshape(num_seqs, width)
        padded[:, :tables.shape[1]] = tables
        padded[:, tables.shape[1]:] = 0
        d64, d32 = self.to_device(buf64), self.to_device(buf32)
        meta = AttentionMetadata(
            slot_mapping=d64[2 * t:2 * t + num_tokens], query_start_loc=d32[:num_seqs + 1],
            seq_lens=d32[q:q + num_seqs], block_tables=d32[q + s:].view(num_seqs, width),
            query_lens_cpu=[b - a for a, b in zip(h.query_start, h.query_start[1:])], seq_lens_cpu=h.seq_lens,
            max_query_len=h.max_query_len, max_seq_len=max(h.seq_lens),
        )
        return d64[:num_tokens], d64[t:t + num_tokens], d64[3 * t:], meta


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
