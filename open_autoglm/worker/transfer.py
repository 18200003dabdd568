"""Host <-> GPU copies for live updates that never stall the engine thread.

Measured on an H100 while the engine decoded (benchmarks/update_stall_gpu.py, RESULTS.md): every
step stalls for the whole of a *pageable* host copy (512 MiB: 40-70 ms, either direction, mapped
files included) and for a page-locked allocation (512 MiB: 660 ms), but not at all for copies
from or to page-locked memory that already exists. So update traffic goes through one small
page-locked bounce buffer per device, allocated once when the engine starts:

    host (pageable, mmap) --CPU memcpy--> bounce chunk --async DMA--> device      (two chunks, so the
    device --async DMA--> bounce chunk --CPU memcpy--> host (pageable)              memcpy of one overlaps
                                                                                    the DMA of the other)

The CPU memcpy runs in torch's copy_, which releases the GIL. Copies on the same device, or with
no GPU involved, are plain copy_ calls.
"""

from __future__ import annotations

import threading

import torch

CHUNK_BYTES = 32 << 20
_bounces: dict[torch.device, _Bounce] = {}
_lock = threading.Lock()


class _Bounce:
    def __init__(self, device: torch.device) -> None:
        self.bufs = [torch.empty(CHUNK_BYTES, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        self.free = [torch.cuda.Event() for _ in range(2)]   # the DMA reading/writing that chunk is done
        self.lock = threading.Lock()                         # one user at a time (update vs switch)


def prepare(device: torch.device) -> None:
    """Allocate `device`'s bounce buffer now (engine start), not during the first update."""
    if device.type == "cuda":
        _bounce(device)


def _bounce(device: torch.device) -> _Bounce:
    with _lock:
        if device not in _bounces:
            _bounces[device] = _Bounce(device)
        return _bounces[device]


def copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst.copy_(src), host <-> GPU through the bounce buffer. To the host: returns when dst holds
    the values. To a GPU: returns once the copies are queued on the current stream (like copy_
    from page-locked memory with non_blocking=True); `src` may be freed or changed at once."""
    host = src if dst.device.type == "cuda" else dst
    if dst.device.type == src.device.type or "cuda" not in (dst.device.type, src.device.type) \
            or dst.numel() == 0 or host.is_pinned():  # no pageable host memory involved: copy_ is stall-free
        dst.copy_(src)
        return
    to_gpu = dst.device.type == "cuda"
    same_layout = dst.dtype == src.dtype and dst.is_contiguous()
    target = dst if same_layout else torch.empty(src.shape, dtype=src.dtype, device=dst.device)
    if to_gpu:
        _h2d(_bytes(target), _bytes(src.contiguous()), _bounce(dst.device))
    else:
        _d2h(_bytes(target), _bytes(src.contiguous()), _bounce(src.device))
    if target is not dst:
        dst.copy_(target)


def to_host(t: torch.Tensor) -> torch.Tensor:
    """A pageable host copy of `t` (through the bounce buffer when `t` is on a GPU)."""
    out = torch.empty(t.shape, dtype=t.dtype, device="cpu")
    copy(out, t.contiguous())
    return out


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def _h2d(dst: torch.Tensor, src: torch.Tensor, b: _Bounce) -> None:
    stream = torch.cuda.current_stream(dst.device)
    with b.lock:
        for i, off in enumerate(range(0, src.numel(), CHUNK_BYTES)):
            n = min(CHUNK_BYTES, src.numel() - off)
            buf, free = b.bufs[i % 2], b.free[i % 2]
            free.synchronize()                  # the DMA that last read this chunk is done
            buf[:n].copy_(src[off:off + n])     # CPU memcpy (GIL released)
            dst[off:off + n].copy_(buf[:n], non_blocking=True)
            free.record(stream)
    # No wait for the last DMAs: they are queued on `stream` before anything the caller runs next
    # on it (the update thread's side stream is synchronized before a switch; the switch syncs).


def _d2h(dst: torch.Tensor, src: torch.Tensor, b: _Bounce) -> None:
    stream = torch.cuda.current_stream(src.device)
    with b.lock:
        starts = list(range(0, src.numel(), CHUNK_BYTES))

        def issue(i: int) -> None:
            off = starts[i]
            n = min(CHUNK_BYTES, src.numel() - off)
            b.bufs[i % 2][:n].copy_(src[off:off + n], non_blocking=True)
            b.free[i % 2].record(stream)

        issue(0)
        for i, off in enumerate(starts):
            if i + 1 < len(starts):
                issue(i + 1)                    # next chunk's DMA runs during this chunk's memcpy
            n = min(CHUNK_BYTES, src.numel() - off)
            b.free[i % 2].synchronize()
            dst[off:off + n].copy_(b.bufs[i % 2][:n])
