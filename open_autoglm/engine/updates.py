"""Live model updates of one engine: full hot swap, delta, rollback, resident versions, lazy load.

One `UpdateManager` per LLMEngine (`engine.updates`). An update runs on the caller's thread
(the admin route's worker thread, a CLI, a test) and touches the engine only between steps:

    update thread                                        engine thread (before each step)
    resolve -> load + verify (staging copy) -> warm-up
            -> snapshot of what will be overwritten
            -> install the switch ───────────────────▶  policy: drain? hold new requests until the
                                                         running ones finish (or drain_timeout)
                                                         copy_ into the live weights (restore on failure)
                                                         new version; requeue requests per policy
            ◀── report ─────────────────────────────────

In-flight policy (what happens to requests that already have KV under the old weights):

    policy    | running requests                          | new requests
    drain     | finish on the old weights (after          | held until the switch, then start on the
              | drain_timeout: recomputed, never failed)  | new weights
    recompute | KV dropped, recomputed on the new weights | start on the new weights
    abort     | aborted (finish_reason "abort")           | start on the new weights

A request's `version` names the weights its KV was computed under: it seeds the prefix-cache hash
chain (so KV is never shared across versions) and is every response's system_fingerprint.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import shutil
import tempfile
import threading
import time
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from open_autoglm.engine.request import RequestOutput, RequestStatus
from open_autoglm.errors import ModelLoadError
from open_autoglm.registry import (
    DeltaError,
    Manifest,
    Registry,
    RegistryError,
    compute_manifest,
    diff_manifests,
)
from open_autoglm.registry.delta import read_delta
from open_autoglm.registry.manifest import MANIFEST_FILE, folder_files, weight_files
from open_autoglm.worker import updates as wu
from open_autoglm.worker.updates import Patch, UpdateError, UpdateInProgress
from open_autoglm.worker.version import folder_version

if TYPE_CHECKING:
    from open_autoglm.engine.llm_engine import LLMEngine

logger = logging.getLogger(__name__)

POLICIES = ("drain", "recompute", "abort")
MODES = ("full", "delta", "auto")
STAGINGS = ("auto", "host", "device")
DEFAULT_WARMUP_PROMPTS = ("The capital of France is",)
# Config keys that do not change what the weights compute (anything else differing needs a restart).
IGNORED_CONFIG_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures",
                       "bos_token_id", "eos_token_id", "pad_token_id", "use_cache", "_commit_hash"}


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
class _Switch:
    patch: Patch
    backup: list[torch.Tensor]          # old values of patch.targets, restored if anything fails
    identity: Identity
    policy: str
    report: UpdateReport
    on_done: Any                        # () -> None, bookkeeping on the engine thread
    deadline: float = 0.0
    installed: float = 0.0
    done: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


class UpdateManager:
    def __init__(self, engine: LLMEngine, registry: str | None = None, history_depth: int = 2,
                 max_resident: int = 3, drain_timeout: float = 60.0, warmup_tokens: int = 2) -> None:
        self.engine = engine
        self.registry_root = registry
        self.history_depth = history_depth
        self.max_resident = max_resident
        self.drain_timeout = drain_timeout
        self.warmup_tokens = warmup_tokens
        self.strategy = engine.config.load_strategy
        manifest = _folder_manifest(engine.model_path)
        self.identity = Identity(engine.version, manifest, engine.model_path, engine.tokenizer,
                                 engine.eos_token_ids, engine.hf_config)
        self.history: deque[HistoryEntry] = deque()
        self.resident: OrderedDict[str, tuple[Identity, dict[str, torch.Tensor]]] = OrderedDict()
        self.counters = UpdateCounters()
        self.last_report: UpdateReport | None = None
        self.current: UpdateReport | None = None
        self.lazy_source = None          # ModelSource whose weights load on the first request
        self.lazy_load_seconds: float | None = None
        self._versions: dict[str, str] = {}  # version name -> manifest hash (names stay unique)
        if manifest is not None:
            self._versions[engine.version] = manifest.manifest_hash
        self._lock = threading.Lock()
        self._switch: _Switch | None = None
        self._held: deque = deque()
        self._outputs: list[RequestOutput] = []
        self._files = tempfile.TemporaryDirectory(prefix="autoglm-update-files-")

    # -- public API (any thread but the engine's; driver = the AsyncEngine running the engine) --
    def update(self, source: UpdateSource, policy: str = "drain", *, mode: str = "full", staging: str = "auto",
               warmup_prompts: list[str] | None = None, drain_timeout: float | None = None,
               driver=None) -> UpdateReport:
        """Hot swap (mode full) or delta update (mode delta; `auto` picks by what the path is)."""
        _check_choice("policy", policy, POLICIES)
        _check_choice("mode", mode, MODES)
        _check_choice("staging", staging, STAGINGS)
        report = self._begin("full" if mode == "auto" else mode, policy)
        try:
            self._ensure_loaded(driver)
            with self._stage(report, "resolve"):
                path, manifest = self._resolve(source)
            if mode == "auto":
                report.mode = mode = "delta" if path.is_file() and path.suffix != ".gguf" else "full"
            sw = (self._plan_full(path, manifest, staging, self._prompts(warmup_prompts), report) if mode == "full"
                  else self._plan_delta(path, manifest, warmup_prompts or [], report))
        except BaseException as e:
            raise self._abandon(report, e) from None
        if sw is None:  # already serving exactly these weights
            report.status = "noop"
            self._release(report)
            return report
        return self._install(sw, policy, drain_timeout, driver)

    def rollback(self, policy: str = "drain", *, drain_timeout: float | None = None, driver=None) -> UpdateReport:
        """Undo the last update: copy back the tensors it overwrote (kept on host)."""
        _check_choice("policy", policy, POLICIES)
        report = self._begin("rollback", policy)
        try:
            if not self.history:
                raise UpdateError("resolve", "nothing to roll back: no update since start (or history exhausted)")
            entry = self.history[-1]
            with self._stage(report, "snapshot"):
                backup = self._backup_for(entry.patch.targets, entry.patch.names, entry.mode == "full")
            report.num_tensors = len(entry.patch.targets)
            report.model_bytes = wu.nbytes_of(self.engine.model.parameters())
            report.to_version = entry.previous.version
            report.manifest_hash = entry.previous.manifest_hash
            report.staging = "host"

            def on_done() -> None:
                self.history.pop()
                self.counters.rollbacks += 1

            sw = _Switch(entry.patch, backup, entry.previous, policy, report, on_done)
        except BaseException as e:
            raise self._abandon(report, e) from None
        return self._install(sw, policy, drain_timeout, driver)

    def preload(self, source: UpdateSource, warmup_prompts: list[str] | None = None) -> UpdateReport:
        """Load, verify and warm up a version into host memory without switching (load_strategy
        resident): a later update to it only copies."""
        report = self._begin("preload", "none")
        try:
            if self.strategy != "resident":
                raise UpdateError("resolve", "preload keeps versions in host memory: it needs load_strategy resident")
            with self._stage(report, "resolve"):
                path, manifest = self._resolve(source)
            identity, weights, _ = self._load_full(path, manifest, "host", self._prompts(warmup_prompts), report)
            self._keep_resident(identity, weights)
            report.status = "done"
        except BaseException as e:
            raise self._abandon(report, e) from None
        self._release(report)
        return report

    def status(self) -> dict:
        ident, sw = self.identity, self._switch
        return {
            "version": ident.version, "manifest_hash": ident.manifest_hash, "model_path": str(ident.model_path),
            "load_strategy": self.strategy, "weights_loaded": self.lazy_source is None,
            "in_progress": self.current.to_json() if self.current is not None else None,
            "pending_switch": None if sw is None else {"policy": sw.policy, "held_requests": len(self._held)},
            "history": [{"mode": h.mode, "rollback_to": h.previous.version, "num_tensors": len(h.patch.targets),
                         "bytes": h.patch.nbytes} for h in list(self.history)],
            "resident": [{"version": i.version, "manifest_hash": h, "bytes": wu.nbytes_of(w.values())}
                         for h, (i, w) in list(self.resident.items())],
            "last_update": self.last_report.to_json() if self.last_report is not None else None,
            "held_bytes": self.held_bytes(),
        }

    def held_bytes(self) -> int:
        """Host bytes kept for rollback and resident versions (each tensor counted once)."""
        seen: dict[int, int] = {}
        for entry in self.history:
            for t in entry.patch.values:
                seen[t.data_ptr()] = t.numel() * t.element_size()
        for _, weights in self.resident.values():
            for t in weights.values():
                seen[t.data_ptr()] = t.numel() * t.element_size()
        return sum(seen.values())

    # -- engine-thread hooks (called by LLMEngine) ---------------------------------------------
    def on_start(self, source) -> None:
        """After the engine is built: lazy keeps `source` for the first request; the others warm up."""
        if self.strategy == "lazy":
            self.lazy_source = source
            return
        e = self.engine
        prompts = self._encode_all(e.tokenizer, list(DEFAULT_WARMUP_PROMPTS[:1]))
        try:
            wu.warmup(e.model, e.runner.kv_spec, e.device, prompts, 1)
        except UpdateError as err:
            raise ModelLoadError(f"{e.model_path}: {err.message}") from None

    def has_work(self) -> bool:
        return self._switch is not None or bool(self._outputs)

    def before_step(self) -> list[RequestOutput]:
        if self.lazy_source is not None and self.engine.scheduler.has_unfinished():
            self.load_lazy()
        sw = self._switch
        if sw is not None:
            self._advance(sw)
        outputs, self._outputs = self._outputs, []
        return outputs

    def load_lazy(self) -> None:
        from open_autoglm.worker.weights import load_weights

        t0 = time.perf_counter()
        source, self.lazy_source = self.lazy_source, None
        load_weights(self.engine.model, source.tensors())
        self.lazy_load_seconds = time.perf_counter() - t0
        logger.info("lazy load: weights of %s read in %.2fs", source.path, self.lazy_load_seconds)

    # -- planning (update thread) ----------------------------------------------------------------
    def _resolve(self, source: UpdateSource) -> tuple[Path, Manifest | None]:
        if source.model:
            reg = Registry(source.registry or self.registry_root)
            version = source.version or reg.list_versions(source.model)[-1].version
            path = reg.resolve(source.model, version)
        elif source.path:
            path = Path(source.path).expanduser()
            if not path.exists():
                raise UpdateError("resolve", f"{path}: no such file or folder")
        else:
            raise UpdateError("resolve", "give a path, or a registry model (and version)")
        manifest_file = path / MANIFEST_FILE
        if path.is_dir() and manifest_file.is_file():
            try:
                return path, Manifest.load(manifest_file)
            except RegistryError as e:
                raise UpdateError("verify", str(e)) from None
        return path, None

    def _plan_full(self, path: Path, manifest: Manifest | None, staging: str, prompts, report) -> _Switch | None:
        if not path.is_dir() and path.suffix != ".gguf":
            raise UpdateError("resolve", f"{path} is a file: a full swap needs a model folder (or .gguf); "
                                         f"use mode delta for a delta package")
        if manifest is not None and manifest.manifest_hash == self.identity.manifest_hash:
            report.to_version = self.identity.version
            return None
        identity, weights, staged_on = self._load_full(path, manifest, staging, prompts, report)
        patch = wu.full_patch(self.engine.model, weights)
        with self._stage(report, "snapshot"):
            backup = self._backup_for(patch.targets, patch.names, True)
        old = self.identity

        def on_done() -> None:
            self._push_history(HistoryEntry("full", old, patch.undo(backup)))
            if self.strategy == "resident":
                self._keep_resident(old, dict(zip(patch.names, backup)))
                if staged_on.type == "cpu":
                    self._keep_resident(identity, weights)

        return _Switch(patch, backup, identity, report.policy, report, on_done)

    def _load_full(self, path: Path, manifest: Manifest | None, staging: str, prompts, report):
        """(identity, weights by parameter name, device) of a folder: from the resident cache, or
        staged in a shadow model, verified and warmed up."""
        from open_autoglm.models.loader import open_source

        e = self.engine
        report.model_bytes = wu.nbytes_of(e.model.parameters())
        cached = self.resident.get(manifest.manifest_hash) if manifest is not None else None
        if cached is not None:  # loaded, verified and warmed up before: only the copy is left
            self.resident.move_to_end(manifest.manifest_hash)
            report.staging, report.to_version = "resident", cached[0].version
            report.manifest_hash, report.num_tensors = manifest.manifest_hash, len(cached[1])
            return cached[0], cached[1], torch.device("cpu")
        with self._stage(report, "load"):
            source = open_source(path)
        with self._stage(report, "compat"):
            self._check_config(source.hf_config)
        with self._stage(report, "memory"):
            device = self._staging_device(staging, report)
            backend = self._backend_for(device)
        with self._stage(report, "load"):
            shadow = wu.build_shadow(e.model, e.hf_config, device, backend)
            if path.is_dir():
                manifest = wu.load_verified(shadow, path, manifest).manifest
            else:
                _load_unverified(shadow, source)
        name = manifest.version if manifest is not None and manifest.version else folder_version(path)
        identity = Identity(self._unique(name, manifest), manifest, path, source.tokenizer,
                            source.eos_token_ids, source.hf_config)
        report.to_version, report.manifest_hash = identity.version, identity.manifest_hash
        with self._stage(report, "warmup"):
            ids = self._encode_all(source.tokenizer, prompts)
            outs = wu.warmup(shadow, e.runner.kv_spec, device, ids, self.warmup_tokens)
            report.warmup = [source.tokenizer.decode(o) for o in outs]
        weights = {n: p.data for n, p in shadow.named_parameters()}
        report.num_tensors = len(weights)
        return identity, weights, device

    def _plan_delta(self, path: Path, manifest: Manifest | None, prompts, report) -> _Switch | None:
        e = self.engine
        report.model_bytes = wu.nbytes_of(e.model.parameters())
        with self._stage(report, "base"):
            live = self._live_manifest()
        if path.is_file():
            target, patch, files_path = self._stage_delta_file(path, live, report)
        else:
            target, patch, files_path = self._stage_registry_diff(path, manifest, live, report)
            if target is None:
                report.to_version = self.identity.version
                return None
        identity = self._identity_after_delta(target, files_path, path if path.is_dir() else None, report)
        report.to_version, report.manifest_hash = identity.version, target.manifest_hash
        report.num_tensors, report.staging = len(patch.targets), "device" if e.device.type == "cuda" else "host"
        with self._stage(report, "warmup"):
            bad = [n for n, v in zip(patch.names, patch.values) if v.is_floating_point() and not v.isfinite().all()]
            if bad:
                raise UpdateError("warmup", f"non-finite values (NaN/inf) in {', '.join(bad[:5])}")
            ids = self._encode_all(identity.tokenizer, prompts)
            if ids:  # asked for: prompts on a shadow sharing the untouched live weights
                shadow = wu.build_shadow(e.model, e.hf_config, e.device, self._backend_for(e.device),
                                         wu.patched_params(e.model, patch))
                outs = wu.warmup(shadow, e.runner.kv_spec, e.device, ids, self.warmup_tokens)
                report.warmup = [identity.tokenizer.decode(o) for o in outs]
                del shadow
        with self._stage(report, "snapshot"):
            backup = self._backup_for(patch.targets, patch.names, False)
        old = self.identity

        def on_done() -> None:
            self._push_history(HistoryEntry("delta", old, patch.undo(backup)))

        return _Switch(patch, backup, identity, report.policy, report, on_done)

    def _stage_delta_file(self, path: Path, live: Manifest, report):
        with self._stage(report, "verify"):
            pkg = read_delta(path)
        with pkg:
            with self._stage(report, "base"):
                pkg.check_base(live.manifest_hash)
            with self._stage(report, "compat"):
                _check_same_layout(live, pkg.target_manifest)
            with self._stage(report, "verify"):
                pkg.verify()
            with self._stage(report, "load"):
                patch = wu.stage_patch(self.engine.model, pkg.tensors(verify=False), self.engine.device)
                files = dict(pkg.files(verify=False))
            files_path = self._overlay(files, pkg.removed_files) if files or pkg.removed_files else None
            return pkg.target_manifest, patch, files_path

    def _stage_registry_diff(self, path: Path, manifest: Manifest | None, live: Manifest, report):
        with self._stage(report, "verify"):
            target = manifest or compute_manifest(path)
        with self._stage(report, "compat"):
            diff = diff_manifests(live, target)
            refusals = diff.delta_refusals()
            if refusals:
                raise UpdateError("compat", f"not a delta of the live version: {'; '.join(refusals[:3])}; "
                                            f"use a full swap")
        if target.manifest_hash == live.manifest_hash:
            return None, None, None
        with self._stage(report, "load"):
            tensors = wu.read_changed(path, target, [c.name for c in diff.changed])
            patch = wu.stage_patch(self.engine.model, tensors, self.engine.device)
        changed_files = diff.files_changed or diff.files_added or diff.files_removed
        return target, patch, path if changed_files else None

    def _identity_after_delta(self, target: Manifest, files_path: Path | None, folder: Path | None,
                              report) -> Identity:
        from open_autoglm.models.loader import open_source

        cur = self.identity
        name = self._unique(target.version or f"sha-{target.manifest_hash[:12]}", target)
        if files_path is None:
            return Identity(name, target, folder or cur.model_path, cur.tokenizer, cur.eos_token_ids, cur.hf_config)
        with self._stage(report, "compat"):
            source = open_source(files_path)
            self._check_config(source.hf_config)
        return Identity(name, target, folder or files_path, source.tokenizer, source.eos_token_ids, source.hf_config)

    def _overlay(self, files: dict[str, bytes], removed: list[str]) -> Path:
        """A folder with the live version's model files, changed by a delta (tokenizer, config)."""
        base = self.identity.model_path
        out = Path(tempfile.mkdtemp(dir=self._files.name))
        paths = folder_files(base)
        for rel in set(paths) - set(weight_files(base, paths)):
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(base / rel, out / rel)
        for rel, data in files.items():
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_bytes(data)
        for rel in removed:
            (out / rel).unlink(missing_ok=True)
        return out

    def _live_manifest(self) -> Manifest:
        ident = self.identity
        if ident.manifest is None:
            if not ident.model_path.is_dir():
                raise UpdateError("base", f"the live weights ({ident.model_path.name}) have no manifest: "
                                          f"apply a full swap to a model folder first")
            ident.manifest = compute_manifest(ident.model_path)
            self._versions.setdefault(ident.version, ident.manifest.manifest_hash)
        return ident.manifest

    # -- the switch --------------------------------------------------------------------------------
    def _install(self, sw: _Switch, policy: str, drain_timeout: float | None, driver) -> UpdateReport:
        timeout = self.drain_timeout if drain_timeout is None else drain_timeout
        sw.policy, sw.report.stage = policy, "drain" if policy == "drain" else "switch"

        sw.installed = time.monotonic()  # "drain" counts from here: waiting for the step to end is not work
        sw.deadline = sw.installed + timeout

        def install(_engine) -> None:
            self._switch = sw

        try:
            if driver is None:  # we are the thread that steps the engine
                install(self.engine)
                self._advance(sw)
                if not sw.done.done():
                    sw.report.status = "pending"  # completes in a later step(), once running requests finish
                    return sw.report
            else:
                driver.submit(install).result()
                while not sw.done.done():
                    with contextlib.suppress(concurrent.futures.TimeoutError):
                        sw.done.result(timeout=0.5)
                    if not sw.done.done() and not driver.is_alive:
                        raise UpdateError("switch", "the engine stopped while the update waited for its switch")
        except BaseException as e:
            if sw.done.done():
                raise
            self._switch = None  # the switch never ran
            raise self._abandon(sw.report, e) from None
        sw.done.result()  # raises the UpdateError of a failed switch
        return sw.report

    def _advance(self, sw: _Switch) -> None:
        sched = self.engine.scheduler
        in_flight = bool(sched.running) or any(r.status == RequestStatus.PREEMPTED for r in sched.waiting)
        if sw.policy == "drain" and in_flight and time.monotonic() < sw.deadline:
            keep = [r for r in sched.waiting if r.status != RequestStatus.WAITING]
            self._held.extend(r for r in sched.waiting if r.status == RequestStatus.WAITING)
            sched.waiting.clear()
            sched.waiting.extend(keep)
            sw.report.requests["held"] = max(sw.report.requests.get("held", 0), len(self._held))
            return
        self._switch = None
        self._run_switch(sw)

    def _run_switch(self, sw: _Switch) -> None:
        t0 = time.monotonic()
        sw.report.seconds["drain"] = round(t0 - sw.installed, 6)
        try:
            wu.copy_patch(sw.patch, sw.backup)
        except BaseException as err:
            self._requeue(sw, switched=False)
            self._finish(sw, err)
            return
        self._set_identity(sw.identity)
        self._requeue(sw, switched=True)
        sw.report.bytes_moved = sw.patch.nbytes
        sw.report.seconds["switch"] = round(time.monotonic() - t0, 6)
        sw.on_done()
        self._finish(sw, None)

    def _requeue(self, sw: _Switch, switched: bool) -> None:
        """After the switch every request runs on the new weights: in-flight ones are recomputed
        (drain stragglers, recompute) or aborted; held and fresh ones are re-tagged."""
        e = self.engine
        sched, bm = e.scheduler, e.block_manager
        fresh = [r for r in sched.waiting if r.status == RequestStatus.WAITING]
        held = [r for r in self._held if not r.status.finished]
        self._held.clear()
        if not switched:  # the old version keeps serving: held requests go back in arrival order
            older = [r for r in sched.waiting if r.status != RequestStatus.WAITING]
            sched.waiting.clear()
            sched.waiting.extend(older + held + fresh)
            return
        in_flight = list(sched.running) + [r for r in sched.waiting if r.status == RequestStatus.PREEMPTED]
        moved: list = []
        for r in in_flight:
            if sw.policy == "abort":
                r.error = f"aborted: weights updated to {sw.identity.version}"
                out = e.abort_request(r.request_id)
                if out is not None:
                    self._outputs.append(out)
                continue
            if r in sched.running:  # drop its KV; it is recomputed from its tokens so far
                sched.running.remove(r)
                bm.free(r)
            r.num_computed_tokens = 0
            r.status = RequestStatus.PREEMPTED
            moved.append(r)
        queue = moved + held + fresh
        for r in queue:
            r.version = sw.identity.version
            bm.forget_hashes(r)
        sched.waiting.clear()
        sched.waiting.extend(queue)
        counts = sw.report.requests
        counts["aborted" if sw.policy == "abort" else "recomputed"] = len(in_flight)
        counts["held"] = max(counts.get("held", 0), len(held))

    def _set_identity(self, ident: Identity) -> None:
        e = self.engine
        e.version, e.model_path, e.tokenizer = ident.version, ident.model_path, ident.tokenizer
        e.eos_token_ids, e.hf_config = ident.eos_token_ids, ident.hf_config
        self.identity = ident

    # -- bookkeeping -------------------------------------------------------------------------------
    def _begin(self, mode: str, policy: str) -> UpdateReport:
        if not self._lock.acquire(blocking=False):
            cur = self.current
            raise UpdateInProgress(f"an update is in progress ({cur.mode} {cur.from_version} -> "
                                   f"{cur.to_version or '?'}, stage {cur.stage})" if cur else "an update is in progress")
        report = UpdateReport(mode, policy, self.identity.version)
        report.seconds["started"] = time.time()
        self.current = report
        return report

    def _release(self, report: UpdateReport) -> None:
        if report.status != "failed":
            report.stage = ""
        report.seconds["total"] = round(time.time() - report.seconds.pop("started", time.time()), 6)
        self.last_report, self.current = report, None
        self._lock.release()

    def _finish(self, sw: _Switch, error: BaseException | None) -> None:
        report = sw.report
        if error is None:
            report.status = "done"
            self._release(report)
            self.counters.durations.setdefault(report.mode, []).append(report.seconds["total"])
            self.counters.bytes[report.mode] = self.counters.bytes.get(report.mode, 0) + report.bytes_moved
            logger.info("%s %s -> %s (%s): %d tensors, %.1f MiB in %.3fs (switch %.1f ms)", report.mode,
                        report.from_version, report.to_version, report.policy, report.num_tensors,
                        report.bytes_moved / 2**20, report.seconds["total"], 1e3 * report.seconds["switch"])
            sw.done.set_result(report)
            return
        sw.done.set_exception(self._abandon(report, error))

    def _abandon(self, report: UpdateReport, error: BaseException) -> UpdateError:
        """Count a failure, release the lock; returns the error to raise."""
        err = self._as_update_error(report, error)
        report.status, report.stage, report.error = "failed", err.stage, err.message
        self.counters.failures[err.stage] = self.counters.failures.get(err.stage, 0) + 1
        logger.warning("%s failed at %s: %s (still serving %s)", report.mode, err.stage, err.message,
                       self.identity.version)
        if self._lock.locked() and self.current is report:
            self._release(report)
        return err

    @staticmethod
    def _as_update_error(report: UpdateReport, e: BaseException) -> UpdateError:
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

    @contextlib.contextmanager
    def _stage(self, report: UpdateReport, name: str):
        report.stage = name
        t0 = time.perf_counter()
        try:
            yield
        finally:
            report.seconds[name] = round(report.seconds.get(name, 0.0) + time.perf_counter() - t0, 6)

    def _push_history(self, entry: HistoryEntry) -> None:
        self.history.append(entry)
        while len(self.history) > self.history_depth:
            self.history.popleft()

    def _keep_resident(self, identity: Identity, weights: dict[str, torch.Tensor]) -> None:
        if identity.manifest_hash is None or self.strategy != "resident":
            return
        self.resident[identity.manifest_hash] = (identity, weights)
        self.resident.move_to_end(identity.manifest_hash)
        while len(self.resident) > self.max_resident:
            self.resident.popitem(last=False)

    def _backup_for(self, targets: list[torch.Tensor], names: list[str], full: bool) -> list[torch.Tensor]:
        """Old values of `targets`: the resident copy of the live version if there is one, else a snapshot."""
        cached = self.resident.get(self.identity.manifest_hash or "") if full else None
        if cached is not None:
            return [cached[1][n] for n in names]
        need = wu.nbytes_of(targets)
        if wu.host_available_bytes() < need + (64 << 20):
            raise UpdateError("memory", f"snapshot for rollback needs {need / 2**20:.0f} MiB of host memory, "
                                        f"{wu.host_available_bytes() / 2**20:.0f} MiB available")
        return wu.snapshot(targets)

    def _staging_device(self, staging: str, report: UpdateReport) -> torch.device:
        e = self.engine
        need = report.model_bytes
        if e.device.type == "cuda" and staging != "host" and self.strategy != "resident":
            if wu.device_free_bytes(e.device) >= need * 1.05 + (256 << 20):
                report.staging = "device"
                return e.device
            if staging == "device":
                raise UpdateError("memory", f"no room for a second copy on {e.device} ({need / 2**30:.2f} GiB)")
        need_host = need * (1 if self.identity.manifest_hash in self.resident else 2)
        if wu.host_available_bytes() < need_host + (64 << 20):
            raise UpdateError("memory", f"staging needs {need_host / 2**20:.0f} MiB of host memory, "
                                        f"{wu.host_available_bytes() / 2**20:.0f} MiB available")
        report.staging = "host"
        return torch.device("cpu")

    def _backend_for(self, device: torch.device):
        from open_autoglm.attention import get_attention_backend

        e = self.engine
        return get_attention_backend(e.config.attention_backend if device == e.device else "torch", device)

    def _check_config(self, new_config) -> None:
        from open_autoglm.models.registry import model_class_for

        live = self.engine.hf_config
        if model_class_for(new_config) is not type(self.engine.model):
            raise UpdateError("compat", f"architecture change ({type(self.engine.model).__name__} -> "
                                        f"{model_class_for(new_config).__name__}) needs a restart")
        a, b = live.to_dict(), new_config.to_dict()
        changed = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(a.keys() | b.keys())
                   if k not in IGNORED_CONFIG_KEYS and a.get(k) != b.get(k)]
        if changed:
            raise UpdateError("compat", f"shape/config change needs a restart: {'; '.join(changed[:4])}")

    def _unique(self, name: str, manifest: Manifest | None) -> str:
        """Version names stay unique per content: the prefix cache and fingerprints key on them."""
        digest = manifest.manifest_hash if manifest is not None else None
        known = self._versions.get(name)
        if known is not None and known != digest:
            name = f"{name}+{(digest or format(time.time_ns(), 'x'))[:8]}"
        self._versions[name] = digest or ""
        return name

    def _ensure_loaded(self, driver) -> None:
        if self.lazy_source is None:
            return
        if driver is None:
            self.load_lazy()
        else:
            driver.submit(lambda _e: self.lazy_source is not None and self.load_lazy()).result()

    @staticmethod
    def _prompts(prompts: list[str] | None) -> list[str]:
        return list(DEFAULT_WARMUP_PROMPTS if prompts is None else prompts)

    def _encode_all(self, tokenizer, texts: list[str]) -> list[list[int]]:
        vocab = self.engine.hf_config.vocab_size
        encoded = ([t for t in tokenizer.encode(text, add_special_tokens=True) if 0 <= t < vocab] for text in texts)
        return [ids for ids in encoded if ids]


def _folder_manifest(path: Path) -> Manifest | None:
    """The manifest.json of a registry version folder (None elsewhere, or if it cannot be read)."""
    file = path / MANIFEST_FILE
    if not (path.is_dir() and file.is_file()):
        return None
    try:
        return Manifest.load(file)
    except RegistryError as e:
        logger.warning("ignoring %s: %s (deltas will compute the live manifest)", file, e)
        return None


def _load_unverified(shadow, source) -> None:
    """A .gguf has no manifest: strict load, no hashes."""
    from open_autoglm.worker.weights import load_weights

    try:
        load_weights(shadow, source.tensors())
    except ModelLoadError as e:
        raise UpdateError("compat", str(e)) from None


def _check_same_layout(live: Manifest, target: Manifest) -> None:
    diff = diff_manifests(live, target)
    refusals = diff.delta_refusals()
    if refusals:
        raise UpdateError("compat", f"shape change: {'; '.join(refusals[:3])}")


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: invalid value {value!r}; allowed: {', '.join(allowed)}")
