"""What the live-update machinery keeps between calls: the data it passes around, the
one-update-at-a-time ledger (lock, report, counters) and the host copies held for rollback and
resident versions. Plain bookkeeping: nothing here touches the live weights.

    piece          | lives on                | written by
    UpdateLedger   | UpdateManager.ledger    | every update: begin -> (switch) -> release / abandon
    HeldWeights    | UpdateManager.held      | a switch's on_done (history), preload / full swaps (resident)
    Switch         | SwitchRunner.pending    | a plan (engine/update_plans.py) or a rollback
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import threading
import time
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from open_autoglm.errors import ModelLoadError
from open_autoglm.registry import DeltaError, Manifest, RegistryError
from open_autoglm.worker import updates as wu
from open_autoglm.worker.updates import Patch, UpdateError, UpdateInProgress

logger = logging.getLogger(__name__)

POLICIES = ("drain", "recompute", "abort")
MODES = ("full", "delta", "auto")
STAGINGS = ("auto", "host", "device")
DEFAULT_WARMUP_PROMPTS = ("The capital of France is",)


@dataclass(frozen=True)
class UpdateSource:
    """What to load: a model folder / delta file (`path`), or a registry version (`model` + `version`)."""

    path: str | None = None
    model: str | None = None
    version: str | None = None   # version id or alias; default the newest version
    registry: str | None = None  # registry root; default the manager's (~/.cache/open-autoglm/registry)


@dataclass
class Identity:
    """What names the live weights, and the files that go with them (tokenizer, config)."""

    version: str
    manifest: Manifest | None
    model_path: Path
    tokenizer: Any
    eos_token_ids: tuple[int, ...]
    hf_config: Any

    @property
    def manifest_hash(self) -> str | None:
        return self.manifest.manifest_hash if self.manifest is not None else None


@dataclass
class HistoryEntry:
    """What one update overwrote: rollback copies `backup` into `targets` and restores `previous`."""

    mode: str
    previous: Identity
    patch: Patch  # targets = live views, values = their old contents (host)


@dataclass
class UpdateReport:
    mode: str                     # full | delta | rollback | preload
    policy: str
    from_version: str
    to_version: str = ""
    manifest_hash: str | None = None
    staging: str = ""             # host | device | resident (where the new weights waited)
    num_tensors: int = 0
    bytes_moved: int = 0          # bytes copied into the live weights
    model_bytes: int = 0
    seconds: dict[str, float] = field(default_factory=dict)  # per stage, and total
    requests: dict[str, int] = field(default_factory=dict)   # held / recomputed / aborted
    warmup: list[str] = field(default_factory=list)
    status: str = "running"       # running | pending (sync drain) | done | noop | failed
    stage: str = ""               # the stage running now, or the one that failed
    error: str | None = None

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class UpdateCounters:
    """Plain totals for the metrics page (server/admin.py renders them)."""

    durations: dict[str, list[float]] = field(default_factory=dict)  # mode -> seconds of each success
    bytes: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)            # stage -> count
    rollbacks: int = 0


@dataclass
class Switch:
    """A planned switch: everything is staged; only the copy into the live weights is left."""

    patch: Patch
    backup: list[torch.Tensor]          # old values of patch.targets, restored if anything fails
    identity: Identity
    policy: str
    report: UpdateReport
    on_done: Any                        # () -> None, bookkeeping on the engine thread
    deadline: float = 0.0
    installed: float = 0.0
    done: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


@contextlib.contextmanager
def timed_stage(report: UpdateReport, name: str):
    """Mark `name` as the running stage (a failure is blamed on it) and add its seconds to the report."""
    report.stage = name
    t0 = time.perf_counter()
    try:
        yield
    finally:
        report.seconds[name] = round(report.seconds.get(name, 0.0) + time.perf_counter() - t0, 6)


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: invalid value {value!r}; allowed: {', '.join(allowed)}")


class UpdateLedger:
    """One update at a time: the lock, the report in progress, the last one, the counters.

    The lock is taken by `begin` on the update thread and released when the report ends: by
    `release` (noop, preload), by `finish` (on the engine thread, once the switch ran) or by
    `abandon` (any failure, on whichever thread saw it)."""

    def __init__(self) -> None:
        self.counters = UpdateCounters()
        self.current: UpdateReport | None = None
        self.last_report: UpdateReport | None = None
        self._lock = threading.Lock()

    def begin(self, mode: str, policy: str, from_version: str) -> UpdateReport:
        if not self._lock.acquire(blocking=False):
            cur = self.current
            raise UpdateInProgress(f"an update is in progress ({cur.mode} {cur.from_version} -> "
                                   f"{cur.to_version or '?'}, stage {cur.stage})" if cur else "an update is in progress")
        report = UpdateReport(mode, policy, from_version)
        report.seconds["started"] = time.time()
        self.current = report
        return report

    def release(self, report: UpdateReport) -> None:
        if report.status != "failed":
            report.stage = ""
        report.seconds["total"] = round(time.time() - report.seconds.pop("started", time.time()), 6)
        self.last_report, self.current = report, None
        self._lock.release()

    def finish(self, sw: Switch, error: BaseException | None) -> None:
        """The switch ran (engine thread): count it and wake the update thread waiting on `sw.done`."""
        report = sw.report
        if error is None:
            report.status = "done"
            self.release(report)
            self.counters.durations.setdefault(report.mode, []).append(report.seconds["total"])
            self.counters.bytes[report.mode] = self.counters.bytes.get(report.mode, 0) + report.bytes_moved
            logger.info("%s %s -> %s (%s): %d tensors, %.1f MiB in %.3fs (switch %.1f ms)", report.mode,
                        report.from_version, report.to_version, report.policy, report.num_tensors,
                        report.bytes_moved / 2**20, report.seconds["total"], 1e3 * report.seconds["switch"])
            sw.done.set_result(report)
            return
        sw.done.set_exception(self.abandon(report, error))

    def abandon(self, report: UpdateReport, error: BaseException) -> UpdateError:
        """Count a failure, release the lock; returns the error to raise. A failed update never
        switched (or was copied back), so `from_version` is what still serves."""
        err = as_update_error(report, error)
        report.status, report.stage, report.error = "failed", err.stage, err.message
        self.counters.failures[err.stage] = self.counters.failures.get(err.stage, 0) + 1
        logger.warning("%s failed at %s: %s (still serving %s)", report.mode, err.stage, err.message,
                       report.from_version)
        if self._lock.locked() and self.current is report:
            self.release(report)
        return err


def as_update_error(report: UpdateReport, e: BaseException) -> UpdateError:
    """Any failure as an UpdateError naming its stage (the label of the failure counter)."""
    if isinstance(e, UpdateError):
        return e
    stage = report.stage or "load"
    if wu.is_out_of_memory(e):
        return UpdateError("memory", f"out of memory while at {stage}: {e}")
    if isinstance(e, DeltaError):
        text = str(e)
        return UpdateError("base" if "wrong base" in text else "compat" if "shape/dtype" in text else "verify", text)
    if isinstance(e, (RegistryError, ModelLoadError, OSError)):
        return UpdateError(stage, str(e))
    return UpdateError(stage, f"{type(e).__name__}: {e}")


class HeldWeights:
    """Host copies the manager keeps: what each recent update overwrote (rollback history, newest
    last, `history_depth` deep) and, with load_strategy resident, whole versions by manifest hash
    (least recently used dropped past `max_resident`)."""

    def __init__(self, strategy: str, history_depth: int, max_resident: int) -> None:
        self.strategy = strategy
        self.history_depth = history_depth
        self.max_resident = max_resident
        self.history: deque[HistoryEntry] = deque()
        self.resident: OrderedDict[str, tuple[Identity, dict[str, torch.Tensor]]] = OrderedDict()

    def push_history(self, entry: HistoryEntry) -> None:
        self.history.append(entry)
        while len(self.history) > self.history_depth:
            self.history.popleft()

    def keep_resident(self, identity: Identity, weights: dict[str, torch.Tensor]) -> None:
        if identity.manifest_hash is None or self.strategy != "resident":
            return
        self.resident[identity.manifest_hash] = (identity, weights)
        self.resident.move_to_end(identity.manifest_hash)
        while len(self.resident) > self.max_resident:
            self.resident.popitem(last=False)

    def backup_for(self, live: Identity, targets: list[torch.Tensor], names: list[str],
                   full: bool, model_bytes: int) -> list[torch.Tensor]:
        """Old values of `targets`: the resident copy of the live version if there is one, else a
        snapshot: on the GPU when it fits with room left for a later update's shadow copy of the
        model (`model_bytes`), else in host memory."""
        cached = self.resident.get(live.manifest_hash or "") if full else None
        if cached is not None:
            return [cached[1][n] for n in names]
        need = wu.nbytes_of(targets)
        device = targets[0].device if targets else None
        if device is not None and device.type == "cuda" and \
                wu.device_free_bytes(device) >= need + model_bytes + (512 << 20):
            return wu.snapshot(targets, device)
        if wu.host_available_bytes() < need + (64 << 20):
            raise UpdateError("memory", f"snapshot for rollback needs {need / 2**20:.0f} MiB of host memory, "
                                        f"{wu.host_available_bytes() / 2**20:.0f} MiB available")
        return wu.snapshot(targets)

    def held_bytes(self) -> int:
        """Bytes kept for rollback (host or GPU) and resident versions (each tensor counted once)."""
        seen: dict[int, int] = {}
        for entry in self.history:
            for t in entry.patch.values:
                seen[t.data_ptr()] = t.numel() * t.element_size()
        for _, weights in self.resident.values():
            for t in weights.values():
                seen[t.data_ptr()] = t.numel() * t.element_size()
        return sum(seen.values())
