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
    abort     | aborted (finish_reason "abort", error     | start on the new weights
              | "aborted: weights updated to <version>")  |

A request's `version` names the weights its KV was computed under: it seeds the prefix-cache hash
chain (so KV is never shared across versions) and is every response's system_fingerprint.

    module                   | holds
    engine/updates.py        | UpdateManager: the public API, the engine hooks, the live Identity
    engine/update_plans.py   | UpdatePlanner: source -> staged, verified, warmed-up Switch (update thread)
    engine/update_switch.py  | SwitchRunner: drain / copy / requeue between steps (engine thread)
    engine/update_state.py   | data, the one-at-a-time UpdateLedger, HeldWeights (history, resident)
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from open_autoglm.engine.request import RequestOutput
from open_autoglm.engine.update_plans import UpdatePlanner
from open_autoglm.engine.update_state import (
    DEFAULT_WARMUP_PROMPTS,
    MODES,
    POLICIES,
    STAGINGS,
    HeldWeights,
    HistoryEntry,
    Identity,
    Switch,
    UpdateCounters,
    UpdateLedger,
    UpdateReport,
    UpdateSource,
    check_choice,
    timed_stage,
)
from open_autoglm.engine.update_switch import SwitchRunner
from open_autoglm.errors import ModelLoadError
from open_autoglm.registry import Manifest, RegistryError
from open_autoglm.registry.manifest import MANIFEST_FILE
from open_autoglm.worker import transfer
from open_autoglm.worker import updates as wu
from open_autoglm.worker.updates import UpdateError, UpdateInProgress

if TYPE_CHECKING:
    from open_autoglm.engine.llm_engine import LLMEngine

__all__ = ["UpdateError", "UpdateInProgress", "UpdateManager", "UpdateReport", "UpdateSource"]

logger = logging.getLogger(__name__)


class UpdateManager:
    """Live weight updates of one engine (`engine.updates`): plans on the caller's thread
    (UpdatePlanner), switches between steps (SwitchRunner), one at a time (UpdateLedger)."""

    def __init__(self, engine: LLMEngine, registry: str | None = None, history_depth: int = 2,
                 max_resident: int = 3, drain_timeout: float = 60.0, warmup_tokens: int = 2) -> None:
        self.engine = engine
        self.drain_timeout = drain_timeout
        self.strategy = engine.config.load_strategy
        self.identity = Identity(engine.version, _folder_manifest(engine.model_path), engine.model_path,
                                 engine.tokenizer, engine.eos_token_ids, engine.hf_config)
        self.ledger = UpdateLedger()
        self.held = HeldWeights(self.strategy, history_depth, max_resident)
        self.planner = UpdatePlanner(engine, self.held, self.identity, registry, warmup_tokens)
        self.switcher = SwitchRunner(engine, self.ledger, self._set_identity)
        self.lazy_source = None          # ModelSource whose weights load on the first request
        self.lazy_load_seconds: float | None = None
        transfer.prepare(engine.device)  # the page-locked bounce buffer, now rather than mid-update

    # -- read by status(), the admin routes, the metrics and the tests --------------------------
    @property
    def counters(self) -> UpdateCounters:
        return self.ledger.counters

    @property
    def current(self) -> UpdateReport | None:
        return self.ledger.current

    @property
    def last_report(self) -> UpdateReport | None:
        return self.ledger.last_report

    @property
    def history(self) -> deque[HistoryEntry]:
        return self.held.history

    @property
    def resident(self) -> OrderedDict[str, tuple[Identity, dict[str, torch.Tensor]]]:
        return self.held.resident

    # -- public API (any thread but the engine's; driver = the AsyncEngine running the engine) --
    def update(self, source: UpdateSource, policy: str = "drain", *, mode: str = "full", staging: str = "auto",
               warmup_prompts: list[str] | None = None, drain_timeout: float | None = None,
               driver=None) -> UpdateReport:
        """Hot swap (mode full) or delta update (mode delta; `auto` picks by what the path is)."""
        check_choice("policy", policy, POLICIES)
        check_choice("mode", mode, MODES)
        check_choice("staging", staging, STAGINGS)
        report = self.ledger.begin("full" if mode == "auto" else mode, policy, self.identity.version)
        try:
            self._ensure_loaded(driver)
            with timed_stage(report, "resolve"):
                path, manifest = self.planner.resolve(source)
            if mode == "auto":
                report.mode = mode = "delta" if path.is_file() and path.suffix != ".gguf" else "full"
            live, plan = self.identity, self.planner
            with wu.side_stream(self.engine.device), wu.short_gil_slices():
                sw = (plan.plan_full(live, path, manifest, staging, _prompts(warmup_prompts), report)
                      if mode == "full" else plan.plan_delta(live, path, manifest, warmup_prompts or [], report))
        except BaseException as e:
            raise self.ledger.abandon(report, e) from None
        if sw is None:  # already serving exactly these weights
            report.status = "noop"
            self.ledger.release(report)
            return report
        return self._install(sw, policy, drain_timeout, driver)

    def rollback(self, policy: str = "drain", *, drain_timeout: float | None = None, driver=None) -> UpdateReport:
        """Undo the last update: copy back the tensors it overwrote (kept on host)."""
        check_choice("policy", policy, POLICIES)
        report = self.ledger.begin("rollback", policy, self.identity.version)
        try:
            if not self.history:
                raise UpdateError("resolve", "nothing to roll back: no update since start (or history exhausted)")
            entry = self.history[-1]
            with timed_stage(report, "snapshot"), wu.side_stream(self.engine.device), wu.short_gil_slices():
                backup = self.held.backup_for(self.identity, entry.patch.targets, entry.patch.names,
                                              entry.mode == "full", wu.nbytes_of(self.engine.model.parameters()))
            report.num_tensors = len(entry.patch.targets)
            report.model_bytes = wu.nbytes_of(self.engine.model.parameters())
            report.to_version = entry.previous.version
            report.manifest_hash = entry.previous.manifest_hash
            with timed_stage(report, "load"), wu.side_stream(self.engine.device), wu.short_gil_slices():
                patch = wu.on_device(entry.patch, self.engine.device)  # the switch then copies on the device
            report.staging = "device" if patch is not entry.patch else "host"

            def on_done() -> None:
                self.history.pop()
                self.counters.rollbacks += 1

            sw = Switch(patch, backup, entry.previous, policy, report, on_done)
        except BaseException as e:
            raise self.ledger.abandon(report, e) from None
        return self._install(sw, policy, drain_timeout, driver)

    def preload(self, source: UpdateSource, warmup_prompts: list[str] | None = None) -> UpdateReport:
        """Load, verify and warm up a version into host memory without switching (load_strategy
        resident): a later update to it only copies."""
        report = self.ledger.begin("preload", "none", self.identity.version)
        try:
            if self.strategy != "resident":
                raise UpdateError("resolve", "preload keeps versions in host memory: it needs load_strategy resident")
            with timed_stage(report, "resolve"):
                path, manifest = self.planner.resolve(source)
            with wu.side_stream(self.engine.device), wu.short_gil_slices():
                identity, weights, _ = self.planner.load_full(self.identity, path, manifest, "host",
                                                              _prompts(warmup_prompts), report)
            self.held.keep_resident(identity, weights)
            report.status = "done"
        except BaseException as e:
            raise self.ledger.abandon(report, e) from None
        self.ledger.release(report)
        return report

    def status(self) -> dict:
        ident, sw = self.identity, self.switcher.pending
        return {
            "version": ident.version, "manifest_hash": ident.manifest_hash, "model_path": str(ident.model_path),
            "load_strategy": self.strategy, "weights_loaded": self.lazy_source is None,
            "in_progress": self.current.to_json() if self.current is not None else None,
            "pending_switch": None if sw is None else {"policy": sw.policy,
                                                       "held_requests": len(self.switcher.held)},
            "history": [{"mode": h.mode, "rollback_to": h.previous.version, "num_tensors": len(h.patch.targets),
                         "bytes": h.patch.nbytes} for h in list(self.history)],
            "resident": [{"version": i.version, "manifest_hash": h, "bytes": wu.nbytes_of(w.values())}
                         for h, (i, w) in list(self.resident.items())],
            "last_update": self.last_report.to_json() if self.last_report is not None else None,
            "held_bytes": self.held_bytes(),
        }

    def held_bytes(self) -> int:
        """Host bytes kept for rollback and resident versions (each tensor counted once)."""
        return self.held.held_bytes()

    # -- engine-thread hooks (called by LLMEngine) ---------------------------------------------
    def on_start(self, source) -> None:
        """After the engine is built: lazy keeps `source` for the first request; the others warm up."""
        if self.strategy == "lazy":
            self.lazy_source = source
            return
        e = self.engine
        prompts = self.planner.encode_all(e.tokenizer, list(DEFAULT_WARMUP_PROMPTS[:1]))
        try:
            wu.warmup(e.model, e.runner.kv_spec, e.device, prompts, 1)
        except UpdateError as err:
            raise ModelLoadError(f"{e.model_path}: {err.message}") from None

    def has_work(self) -> bool:
        return self.switcher.pending is not None or bool(self.switcher.outputs)

    def before_step(self) -> list[RequestOutput]:
        if self.lazy_source is not None and self.engine.scheduler.has_unfinished():
            self.load_lazy()
        sw = self.switcher.pending
        if sw is not None:
            self.switcher.advance(sw)
        outputs, self.switcher.outputs = self.switcher.outputs, []
        return outputs

    def load_lazy(self) -> None:
        from open_autoglm.worker.weights import load_weights

        t0 = time.perf_counter()
        source, self.lazy_source = self.lazy_source, None
        load_weights(self.engine.model, source.tensors())
        self.lazy_load_seconds = time.perf_counter() - t0
        logger.info("lazy load: weights of %s read in %.2fs", source.path, self.lazy_load_seconds)

    # -- helpers ----------------------------------------------------------------------------------
    def _install(self, sw: Switch, policy: str, drain_timeout: float | None, driver) -> UpdateReport:
        timeout = self.drain_timeout if drain_timeout is None else drain_timeout
        return self.switcher.install(sw, policy, timeout, driver)

    def _set_identity(self, ident: Identity) -> None:
        """Engine thread, right after the copy: the engine now serves `ident`."""
        e = self.engine
        e.version, e.model_path, e.tokenizer = ident.version, ident.model_path, ident.tokenizer
        e.eos_token_ids, e.hf_config = ident.eos_token_ids, ident.hf_config
        self.identity = ident

    def _ensure_loaded(self, driver) -> None:
        if self.lazy_source is None:
            return
        if driver is None:
            self.load_lazy()
        else:
            driver.submit(lambda _e: self.lazy_source is not None and self.load_lazy()).result()


def _prompts(prompts: list[str] | None) -> list[str]:
    return list(DEFAULT_WARMUP_PROMPTS if prompts is None else prompts)


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

