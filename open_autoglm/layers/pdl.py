"""Programmatic dependent launch (PDL, Hopper and newer) for our Triton kernels.

Inside a decode CUDA graph, kernels run back to back and each one's programs are scheduled only
after the previous kernel has fully drained; at batch 1 a step is ~200 such boundaries. With PDL
a kernel is launched with "programmatic stream serialization": its programs may be scheduled as
soon as every program of the previous kernel has started (griddepcontrol.launch_dependents), so
launch and scheduling overlap the previous kernel's tail (NVIDIA, CUDA C++ Programming Guide,
"Programmatic Dependent Launch and Synchronization"; Triton's tutorial 11).

The contract every kernel here keeps, which makes this safe:
  * it calls `pdl_enter(USE_PDL)` before it reads anything an earlier kernel may write
    (activations, the KV cache) and before its first store; griddepcontrol.wait returns only when
    the previous kernel has completed and its writes are visible. Only weights (never written
    while a step runs: a live update copies between steps) are read before it.
  * so a kernel completes only after its predecessor did, and the order of the whole chain is
    the stream's order, whichever kernels (PDL or not, ours or torch's) sit between.
Kernels launched without PDL (torch, cuBLAS) wait for full completion as always.

Off on CPU, under TRITON_INTERPRET, before compute capability 9.0 or CUDA 12.3, and with AUTOGLM_PDL=0.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

try:  # triton >= 3.4
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - older triton: PDL stays off (see pdl_enabled)
    gdc_launch_dependents = gdc_wait = None


@triton.jit
def pdl_enter(USE_PDL: tl.constexpr):
    """Wait for the previous kernel (completed, writes visible), then let the next one launch."""
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()


@functools.cache
def _device_supports(index: int) -> bool:
    # Programmatic edges in captured CUDA graphs need CUDA 12.3 or newer.
    cuda = tuple(int(v) for v in (torch.version.cuda or "0.0").split(".")[:2])
    return torch.cuda.get_device_capability(index)[0] >= 9 and cuda >= (12, 3)


def pdl_enabled(device: torch.device) -> bool:
    if device.type != "cuda" or gdc_wait is None or os.environ.get("AUTOGLM_PDL", "1") == "0":
        return False
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return False
    return _device_supports(device.index if device.index is not None else torch.cuda.current_device())


def pdl_options(device: torch.device) -> dict:
    """Launch keywords for a kernel with a USE_PDL constexpr: pass as `**pdl_options(x.device)`."""
    if pdl_enabled(device):
        return {"USE_PDL": True, "launch_pdl": True}
    return {"USE_PDL": False}
