"""Live weight updates, tensor by tensor: staging, verification, warm-up, snapshot, copy between steps.

The live parameters never move (DESIGN.md, "Weights live at fixed addresses"); an update is a list
of `(live view, new value)` pairs copied with `copy_` inside one between-steps window:

    stage                    | thread         | touches live weights
    read + hash + stage      | update thread  | no (new values go to a staging copy)
    warm-up (full swap)      | update thread  | no (runs a *shadow* model over the staged copy)
    snapshot (for rollback)  | update thread  | reads only (nothing else writes while we hold the update lock)
    copy_                    | engine thread  | yes, between two steps; restored from the snapshot if it fails

A *shadow* model is the live model's class built on the meta device, whose parameters are then
given real storage on the staging device and whose buffers (rotary tables) are the live ones: it
costs no random init and exactly one copy of the weights. Reading a folder (hash every tensor
as it is staged) is worker/update_loading.py.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from open_autoglm.attention.base import AttentionMetadata
from open_autoglm.errors import AutoGLMError
from open_autoglm.worker import transfer
from open_autoglm.worker.kv_cache import KVCacheSpec, allocate_kv_cache
from open_autoglm.worker.weights import WeightMap

# Where an update can fail; the label of autoglm_weight_update_failures_total{stage}.
STAGES = ("resolve", "load", "compat", "memory", "base", "verify", "warmup", "snapshot", "switch")

ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}


class UpdateError(AutoGLMError):
    """A weight update was refused or failed at `stage`; the old version is still serving."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(f"update failed at {stage}: {message}")
        self.stage = stage
        self.message = message


class UpdateInProgress(AutoGLMError):
    """Another update (or rollback) holds the update lock (HTTP 409)."""


def nbytes_of(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# -- bytes -> tensors ----------------------------------------------------------------------------
def tensor_from_bytes(data: memoryview, st_dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A CPU tensor over `data` without a copy (read-only: only ever a copy_ source)."""
    dtype = ST_DTYPES.get(st_dtype)
    if dtype is None:
        raise UpdateError("load", f"unsupported tensor dtype {st_dtype}")
    if len(data) == 0:
        return torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():  # "buffer is not writable": we never write through it
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(data, dtype=dtype).view(shape)


def check_shape(name: str, new: tuple[int, ...], live: torch.Tensor) -> None:
    if tuple(new) != tuple(live.shape):
        raise UpdateError("compat", f"shape change: {name} is {list(new)} in the update but {list(live.shape)} in "
                                    f"the live model; a different architecture needs a restart")


# -- the shadow model ----------------------------------------------------------------------------
def build_shadow(model: nn.Module, hf_config, device: torch.device, backend,
                 params: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """The live model's twin on `device`: uninitialized parameters (same names, shapes, dtypes,
    ties; filled by `load_verified`), or the given `params` by name; the live buffers."""
    with torch.device("meta"), _no_random_init():  # random init on meta would import torch's meta kernels
        shadow = type(model)(hf_config, backend)
    storage = params if params is not None else _shadow_storage(model, device)
    made: dict[int, nn.Parameter] = {}  # meta param id -> real one, so tied weights stay tied
    for prefix, module in shadow.named_modules():
        for leaf, p in list(module._parameters.items()):
            if p is not None:
                if id(p) not in made:
                    data = storage[_join(prefix, leaf)]
                    made[id(p)] = nn.Parameter(data, requires_grad=False)
                module._parameters[leaf] = made[id(p)]
    buffers = dict(model.named_buffers(remove_duplicate=False))
    for prefix, module in shadow.named_modules():
        for leaf in list(module._buffers):
            module._buffers[leaf] = buffers[_join(prefix, leaf)].to(device)
    return shadow.eval()


def _few_allocations(tensors: list[tuple[str, torch.Tensor]], device: torch.device,
                     piece: int = 256 << 20) -> dict[str, torch.Tensor]:
    """Uninitialized tensors shaped like `tensors` (by name), carved from buffers of about `piece`
    bytes: a handful of cudaMallocs instead of one per tensor, none so large that it holds up the
    engine thread's launches for long (each allocation takes the driver for a while)."""
    out: dict[str, torch.Tensor] = {}
    group: list[tuple[str, torch.Tensor, int]] = []
    used = 0

    def flush() -> None:
        nonlocal used
        if group:
            flat = torch.empty(used, dtype=torch.uint8, device=device)
            for name, t, off in group:
                out[name] = flat[off:off + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
            group.clear()
        used = 0

    for name, t in tensors:
        size = t.numel() * t.element_size()
        start = -(-used // 256) * 256
        if group and start + size > piece:
            flush()
            start = 0
        group.append((name, t, start))
        used = start + size
    flush()
    return out


def _shadow_storage(model: nn.Module, device: torch.device) -> dict[str, torch.Tensor]:
    """Storage for a shadow's parameters by name (tied aliases share it)."""
    params = list(model.named_parameters())  # tied weights appear once
    out = _few_allocations(params, device)
    for name, p in model.named_parameters(remove_duplicate=False):
        out.setdefault(name, out[next(n for n, q in params if q is p)])
    return out


def allocate_model(source, dtype: torch.dtype, device: torch.device, backend) -> nn.Module:
    """`build_model` without reading the weights (load_strategy lazy reads them on the first request)."""
    from open_autoglm.models.registry import model_class_for

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), _no_random_init():
            model = model_class_for(source.hf_config)(source.hf_config, backend)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


@contextlib.contextmanager
def _no_random_init():
    """Skip nn.Linear / nn.Embedding random init (the weights are read later anyway), as
    transformers' no_init_weights does. Only used while an engine is being built."""
    names = ("kaiming_uniform_", "uniform_", "normal_")
    saved = {n: getattr(nn.init, n) for n in names}
    for n in names:
        setattr(nn.init, n, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(nn.init, n, fn)


def _join(prefix: str, leaf: str) -> str:
    return f"{prefix}.{leaf}" if prefix else leaf


# -- delta staging --------------------------------------------------------------------------------
@dataclass
class Patch:
    """New values for some live storage: `targets[i].copy_(values[i])` (views of live parameters)."""

    names: list[str]
    targets: list[torch.Tensor]
    values: list[torch.Tensor]
    owners: list[str] = field(default_factory=list)  # the live parameter each target is (a view of)
    non_finite: list[str] = field(default_factory=list)  # staged values holding a NaN or inf

    @property
    def nbytes(self) -> int:
        return nbytes_of(self.values)

    def undo(self, backup: list[torch.Tensor]) -> Patch:
        """The same targets, given `backup` (their old values)."""
        return Patch(self.names, self.targets, backup, self.owners)


@torch.no_grad()
def stage_patch(model: nn.Module, tensors, device: torch.device) -> Patch:
    """Stage (name, dtype, shape, bytes) items onto `device` in the live dtype, next to the live
    storage they replace. Unknown names and shape changes are refused before anything is kept."""
    weight_map = WeightMap(model)
    owner = {id(p): n for n, p in model.named_parameters()}
    patch = Patch([], [], [])
    for name, st_dtype, shape, data in tensors:
        try:
            target = weight_map.target(name)
        except KeyError:
            raise UpdateError("compat", f"tensor {name} is not a weight of the live model") from None
        if target is None:  # e.g. lm_head of a tied model: its storage is the embedding's
            continue
        check_shape(name, tuple(shape), target.view)
        value = torch.empty_like(target.view, device=device)
        host = tensor_from_bytes(data, st_dtype, shape)
        host = host if host.dtype == value.dtype else host.to(value.dtype)  # a cast may overflow to inf
        if host.is_floating_point() and not bool(torch.isfinite(host).all()):
            patch.non_finite.append(name)  # checked here, on the host: no GPU sync on the update thread
        transfer.copy(value, host)
        patch.names.append(name)
        patch.targets.append(target.view)
        patch.values.append(value)
        patch.owners.append(owner[id(target.param)])
    return patch


@torch.no_grad()
def patched_params(model: nn.Module, patch: Patch) -> dict[str, torch.Tensor]:
    """Live parameters as they will be after `patch`, without touching them: the parameters it
    writes are cloned and patched, all others are the live tensors themselves (read only). A
    shadow over these warms up a delta at a cost that scales with the change."""
    live = {n: p.data for n, p in model.named_parameters()}
    out = dict(live)
    for owner, target, value in zip(patch.owners, patch.targets, patch.values):
        if out[owner] is live[owner]:
            out[owner] = live[owner].clone()
        base, clone = live[owner], out[owner]
        offset = target.storage_offset() - base.storage_offset() + clone.storage_offset()
        clone.as_strided(target.shape, target.stride(), offset).copy_(value)
    return out


def full_patch(model: nn.Module, weights: dict[str, torch.Tensor]) -> Patch:
    """Every live parameter <- the same-named tensor of `weights` (a shadow or a host copy)."""
    names = [n for n, _ in model.named_parameters()]
    live = dict(model.named_parameters())
    return Patch(names, [live[n].data for n in names], [weights[n] for n in names], names)


# -- snapshot and copy ----------------------------------------------------------------------------
@torch.no_grad()
def snapshot(targets: list[torch.Tensor], device: torch.device | None = None) -> list[torch.Tensor]:
    """Copies of live storage: on `device` (a GPU with room: a device-to-device copy of a few ms),
    else pageable host memory read through the bounce buffer (worker/transfer.py: page-locked
    allocations and pageable copies on the update thread stall every engine step)."""
    if device is None or device.type != "cuda":
        return [transfer.to_host(t) for t in targets]
    copies = _few_allocations([(str(i), t) for i, t in enumerate(targets)], device)
    out = [copies[str(i)] for i in range(len(targets))]
    for dst, src in zip(out, targets):
        dst.copy_(src)
    return out


def on_device(patch: Patch, device: torch.device) -> Patch:
    """`patch` with its values copied to `device` when there is room (update thread), so the
    switch between steps is a device-to-device copy; else `patch` itself."""
    if device.type != "cuda" or all(v.device == device for v in patch.values):
        return patch
    if device_free_bytes(device) < patch.nbytes + (256 << 20):
        return patch
    values = []
    for v in patch.values:
        staged = torch.empty(v.shape, dtype=v.dtype, device=device)
        transfer.copy(staged, v)
        values.append(staged)
    return Patch(patch.names, patch.targets, values, patch.owners)


@torch.no_grad()
def copy_patch(patch: Patch, backup: list[torch.Tensor] | None) -> int:
    """Copy every value into its live target. If a copy fails, the targets already written (and
    the one that failed) get `backup` back, so the live weights are the old ones again."""
    done = 0
    try:
        for dst, src in zip(patch.targets, patch.values):
            _copy(dst, src)
            done += 1
        _sync(patch.targets)
    except BaseException as e:
        if backup is None:
            raise UpdateError("switch", f"copy failed after {done} of {len(patch.targets)} tensors ({e}); "
                                        f"no snapshot to restore from") from e
        for dst, old in zip(patch.targets[:done + 1], backup[:done + 1]):
            transfer.copy(dst, old)
        _sync(patch.targets)
        raise UpdateError("switch", f"copy failed after {done} of {len(patch.targets)} tensors "
                                    f"({type(e).__name__}: {e}); the old weights were copied back") from e
    return patch.nbytes


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    transfer.copy(dst, src)


def _sync(targets: list[torch.Tensor]) -> None:
    if targets and targets[0].device.type == "cuda":
        torch.cuda.synchronize(targets[0].device)


# -- warm-up --------------------------------------------------------------------------------------
@torch.inference_mode()
def warmup(model: nn.Module, kv_spec: KVCacheSpec, device: torch.device, prompts: list[list[int]],
           num_tokens: int) -> list[list[int]]:
    """Greedy-continue each prompt by `num_tokens` tokens (a fresh prefill per token, scratch KV
    cache); every logit must be finite. Returns the continuations."""
    outputs = []
    for i, prompt in enumerate(prompts):
        ids = list(prompt)
        for _ in range(num_tokens):
            logits = _last_logits(model, kv_spec, device, ids)
            if not bool(torch.isfinite(logits).all()):
                raise UpdateError("warmup", f"warm-up prompt {i} gives non-finite logits (NaN/inf weights?)")
            ids.append(int(logits.argmax()))
        outputs.append(ids[len(prompt):])
    return outputs


def _last_logits(model: nn.Module, kv_spec: KVCacheSpec, device: torch.device, ids: list[int]) -> torch.Tensor:
    n = len(ids)
    num_blocks = -(-n // kv_spec.block_size)
    scratch = allocate_kv_cache(kv_spec, num_blocks, device)
    pos = torch.arange(n, device=device)
    meta = AttentionMetadata(  # one sequence in blocks 0..num_blocks-1, so slot = position
        slot_mapping=pos.clone(),
        query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=device),
        seq_lens=torch.tensor([n], dtype=torch.int32, device=device),
        block_tables=torch.arange(num_blocks, dtype=torch.int32, device=device)[None],
        query_lens_cpu=[n], seq_lens_cpu=[n], max_query_len=n, max_seq_len=n,
    )
    hidden = model(torch.tensor(ids, dtype=torch.long, device=device), pos, scratch, meta)  # [T, hidden]
    return model.compute_logits(hidden[-1:]).float()[0]  # [vocab]


# -- memory ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def short_gil_slices(interval_s: float = 0.0005):
    """While the update thread works, hand the GIL around every 0.5 ms instead of Python's 5 ms.
    The engine thread drops the GIL around each CUDA call and must win it back every time; against
    a busy staging thread each win can cost a whole switch interval (the convoy effect), which
    multiplies into long pauses between decode steps. Process-wide, so one update at a time (409)."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(interval_s)
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


# One per device for the engine's life: the caching allocator keeps freed blocks per stream, so a
# fresh stream per update would cudaMalloc (and, with the KV cache filling the GPU, free other
# streams' cached blocks with a device-wide sync) every time: measured as 25-100 ms engine stalls.
_side_streams: dict[torch.device, torch.cuda.Stream] = {}


@contextlib.contextmanager
def side_stream(device: torch.device):
    """Run the update thread's GPU work (staging copies, snapshots, warm-up) on a CUDA stream of
    its own: on the default stream the engine's decode steps would queue behind a multi-GB copy,
    which is exactly the latency spike a live update must not cause. Waits for it on exit."""
    if device.type != "cuda":
        yield
        return
    stream = _side_streams.setdefault(device, torch.cuda.Stream(device))
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        yield
    stream.synchronize()


def host_available_bytes() -> int:
    """MemAvailable of /proc/meminfo (what can be allocated without swapping)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def device_free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return host_available_bytes()


def is_out_of_memory(e: BaseException) -> bool:
    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "out of memory" in str(e).lower()
