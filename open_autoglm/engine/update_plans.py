"""The update-thread half of a live update: resolve a source, stage + verify + warm up the new
weights, snapshot what they will overwrite, and hand back a Switch (engine/update_switch.py runs it).

    plan       | source                      | staged where                     | warm-up
    full swap  | model folder (or .gguf)     | shadow model on device or host   | the shadow, whole model
    delta file | .delta package              | changed tensors, engine device   | live weights + patched clones
    reg. diff  | registry folder of the live | changed tensors, engine device   | as a delta file
               | version's lineage           |                                  |

Nothing here writes the live weights; a plan that fails leaves no trace but its report.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from open_autoglm.engine.update_state import (
    HeldWeights,
    HistoryEntry,
    Identity,
    Switch,
    UpdateReport,
    UpdateSource,
    timed_stage,
)
from open_autoglm.errors import ModelLoadError
from open_autoglm.registry import Manifest, Registry, RegistryError, compute_manifest, diff_manifests
from open_autoglm.registry.delta import read_delta
from open_autoglm.registry.manifest import MANIFEST_FILE, folder_files, weight_files
from open_autoglm.registry.safetensors_io import hash_file
from open_autoglm.worker import updates as wu
from open_autoglm.worker.update_loading import load_verified, read_changed
from open_autoglm.worker.updates import Patch, UpdateError
from open_autoglm.worker.version import folder_version

if TYPE_CHECKING:
    from open_autoglm.engine.llm_engine import LLMEngine

# Config keys that do not change what the weights compute (anything else differing needs a restart).
IGNORED_CONFIG_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures",
                       "bos_token_id", "eos_token_id", "pad_token_id", "use_cache", "_commit_hash"}


class UpdatePlanner:
    """Builds Switches for one engine. `live` is always the identity serving now (it cannot change
    while a plan runs: the ledger's lock is held until the switch)."""

    def __init__(self, engine: LLMEngine, held: HeldWeights, live: Identity, registry: str | None,
                 warmup_tokens: int) -> None:
        self.engine = engine
        self.held = held
        self.registry_root = registry
        self.warmup_tokens = warmup_tokens
        self.versions: dict[str, str] = {}  # version name -> manifest hash (names stay unique)
        if live.manifest is not None:
            self.versions[live.version] = live.manifest.manifest_hash
        self._files = tempfile.TemporaryDirectory(prefix="autoglm-update-files-")

    def resolve(self, source: UpdateSource) -> tuple[Path, Manifest | None]:
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

    # -- full swap ---------------------------------------------------------------------------------
    def plan_full(self, live: Identity, path: Path, manifest: Manifest | None, staging: str, prompts,
                  report: UpdateReport) -> Switch | None:
        """None if `live` already is exactly these weights."""
        if not path.is_dir() and path.suffix != ".gguf":
            raise UpdateError("resolve", f"{path} is a file: a full swap needs a model folder (or .gguf); "
                                         f"use mode delta for a delta package")
        if manifest is not None and manifest.manifest_hash == live.manifest_hash:
            report.to_version = live.version
            return None
        identity, weights, staged_on = self.load_full(live, path, manifest, staging, prompts, report)
        patch = wu.full_patch(self.engine.model, weights)
        with timed_stage(report, "snapshot"):
            backup = self.held.backup_for(live, patch.targets, patch.names, True, report.model_bytes)
        held = self.held

        def on_done() -> None:
            held.push_history(HistoryEntry("full", live, patch.undo(backup)))
            if held.strategy == "resident":
                held.keep_resident(live, dict(zip(patch.names, backup)))
                if staged_on.type == "cpu":
                    held.keep_resident(identity, weights)

        return Switch(patch, backup, identity, report.policy, report, on_done)

    def load_full(self, live: Identity, path: Path, manifest: Manifest | None, staging: str, prompts,
                  report: UpdateReport):
        """(identity, weights by parameter name, device) of a folder: from the resident cache, or
        staged in a shadow model, verified and warmed up."""
        from open_autoglm.models.loader import open_source

        e = self.engine
        report.model_bytes = wu.nbytes_of(e.model.parameters())
        cached = self.held.resident.get(manifest.manifest_hash) if manifest is not None else None
        if cached is not None:  # loaded, verified and warmed up before: only the copy is left
            self.held.resident.move_to_end(manifest.manifest_hash)
            report.staging, report.to_version = "resident", cached[0].version
            report.manifest_hash, report.num_tensors = manifest.manifest_hash, len(cached[1])
            return cached[0], cached[1], torch.device("cpu")
        with timed_stage(report, "load"):
            source = open_source(path, same_tokenizer(live, path))
        with timed_stage(report, "compat"):
            self._check_config(source.hf_config)
        with timed_stage(report, "memory"):
            device = self._staging_device(live, staging, report)
            backend = self._backend_for(device)
        with timed_stage(report, "load"):
            shadow = wu.build_shadow(e.model, e.hf_config, device, backend)
            if path.is_dir():
                manifest = load_verified(shadow, path, manifest).manifest
            else:
                _load_unverified(shadow, source)
        name = manifest.version if manifest is not None and manifest.version else folder_version(path)
        identity = Identity(self._unique(name, manifest), manifest, path, source.tokenizer,
                            source.eos_token_ids, source.hf_config)
        report.to_version, report.manifest_hash = identity.version, identity.manifest_hash
        with timed_stage(report, "warmup"):
            ids = self.encode_all(source.tokenizer, prompts)
            outs = wu.warmup(shadow, e.runner.kv_spec, device, ids, self.warmup_tokens)
            report.warmup = [source.tokenizer.decode(o) for o in outs]
        weights = {n: p.data for n, p in shadow.named_parameters()}
        report.num_tensors = len(weights)
        return identity, weights, device

    # -- delta ---------------------------------------------------------------------------------------
    def plan_delta(self, live: Identity, path: Path, manifest: Manifest | None, prompts,
                   report: UpdateReport) -> Switch | None:
        """A delta package, or a registry folder applied as the diff from `live`; None if no change."""
        e = self.engine
        report.model_bytes = wu.nbytes_of(e.model.parameters())
        with timed_stage(report, "base"):
            base = self._live_manifest(live)
        if path.is_file():
            target, patch, files_path = self._stage_delta_file(live, path, base, report)
        else:
            target, patch, files_path = self._stage_registry_diff(path, manifest, base, report)
            if target is None:
                report.to_version = live.version
                return None
        identity = self._identity_after_delta(live, target, files_path, path if path.is_dir() else None, report)
        report.to_version, report.manifest_hash = identity.version, target.manifest_hash
        report.num_tensors, report.staging = len(patch.targets), "device" if e.device.type == "cuda" else "host"
        with timed_stage(report, "warmup"):
            self._warm_up_patch(identity, patch, prompts, report)
        with timed_stage(report, "snapshot"):
            backup = self.held.backup_for(live, patch.targets, patch.names, False, report.model_bytes)
        held = self.held

        def on_done() -> None:
            held.push_history(HistoryEntry("delta", live, patch.undo(backup)))

        return Switch(patch, backup, identity, report.policy, report, on_done)

    def _warm_up_patch(self, identity: Identity, patch: Patch, prompts, report: UpdateReport) -> None:
        e = self.engine
        bad = patch.non_finite  # found while staging (worker/updates.py: stage_patch)
        if bad:
            raise UpdateError("warmup", f"non-finite values (NaN/inf) in {', '.join(bad[:5])}")
        ids = self.encode_all(identity.tokenizer, prompts)
        if ids:  # asked for: prompts on a shadow sharing the untouched live weights
            shadow = wu.build_shadow(e.model, e.hf_config, e.device, self._backend_for(e.device),
                                     wu.patched_params(e.model, patch))
            outs = wu.warmup(shadow, e.runner.kv_spec, e.device, ids, self.warmup_tokens)
            report.warmup = [identity.tokenizer.decode(o) for o in outs]
            del shadow

    def _stage_delta_file(self, live: Identity, path: Path, base: Manifest, report: UpdateReport):
        with timed_stage(report, "verify"):
            pkg = read_delta(path)
        with pkg:
            with timed_stage(report, "base"):
                pkg.check_base(base.manifest_hash)
            with timed_stage(report, "compat"):
                _check_same_layout(base, pkg.target_manifest)
            with timed_stage(report, "verify"):
                pkg.verify()
            with timed_stage(report, "load"):
                patch = wu.stage_patch(self.engine.model, pkg.tensors(verify=False), self.engine.device)
                files = dict(pkg.files(verify=False))
            changed = files or pkg.removed_files
            files_path = self._overlay(live.model_path, files, pkg.removed_files) if changed else None
            return pkg.target_manifest, patch, files_path

    def _stage_registry_diff(self, path: Path, manifest: Manifest | None, base: Manifest, report: UpdateReport):
        with timed_stage(report, "verify"):
            target = manifest or compute_manifest(path)
        with timed_stage(report, "compat"):
            diff = diff_manifests(base, target)
            refusals = diff.delta_refusals()
            if refusals:
                raise UpdateError("compat", f"not a delta of the live version: {'; '.join(refusals[:3])}; "
                                            f"use a full swap")
        if target.manifest_hash == base.manifest_hash:
            return None, None, None
        with timed_stage(report, "load"):
            tensors = read_changed(path, target, [c.name for c in diff.changed])
            patch = wu.stage_patch(self.engine.model, tensors, self.engine.device)
        changed_files = diff.files_changed or diff.files_added or diff.files_removed
        return target, patch, path if changed_files else None

    def _identity_after_delta(self, live: Identity, target: Manifest, files_path: Path | None,
                              folder: Path | None, report: UpdateReport) -> Identity:
        from open_autoglm.models.loader import open_source

        name = self._unique(target.version or f"sha-{target.manifest_hash[:12]}", target)
        if files_path is None:
            return Identity(name, target, folder or live.model_path, live.tokenizer, live.eos_token_ids,
                            live.hf_config)
        with timed_stage(report, "compat"):
            source = open_source(files_path, same_tokenizer(live, files_path))
            self._check_config(source.hf_config)
        return Identity(name, target, folder or files_path, source.tokenizer, source.eos_token_ids, source.hf_config)

    def _overlay(self, base: Path, files: dict[str, bytes], removed: list[str]) -> Path:
        """A folder with the live version's model files, changed by a delta (tokenizer, config)."""
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

    def _live_manifest(self, live: Identity) -> Manifest:
        """The manifest a delta's base must match; computed (once) if the live folder has none."""
        if live.manifest is None:
            if not live.model_path.is_dir():
                raise UpdateError("base", f"the live weights ({live.model_path.name}) have no manifest: "
                                          f"apply a full swap to a model folder first")
            live.manifest = compute_manifest(live.model_path)
            self.versions.setdefault(live.version, live.manifest.manifest_hash)
        return live.manifest

    # -- checks and helpers ----------------------------------------------------------------------------
    def _staging_device(self, live: Identity, staging: str, report: UpdateReport) -> torch.device:
        e = self.engine
        need = report.model_bytes
        if e.device.type == "cuda" and staging != "host" and self.held.strategy != "resident":
            if wu.device_free_bytes(e.device) >= need * 1.05 + (256 << 20):
                report.staging = "device"
                return e.device
            if staging == "device":
                raise UpdateError("memory", f"no room for a second copy on {e.device} ({need / 2**30:.2f} GiB)")
        need_host = need * (1 if live.manifest_hash in self.held.resident else 2)
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
        known = self.versions.get(name)
        if known is not None and known != digest:
            name = f"{name}+{(digest or format(time.time_ns(), 'x'))[:8]}"
        self.versions[name] = digest or ""
        return name

    def encode_all(self, tokenizer, texts: list[str]) -> list[list[int]]:
        """Warm-up prompts as token ids the live vocabulary can embed (empty prompts dropped)."""
        vocab = self.engine.hf_config.vocab_size
        encoded = ([t for t in tokenizer.encode(text, add_special_tokens=True) if 0 <= t < vocab] for text in texts)
        return [ids for ids in encoded if ids]


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json")


def same_tokenizer(live: Identity, path: Path):
    """The live tokenizer if `path` holds the same tokenizer files (byte for byte) as the live
    folder, else None (the update loads its own)."""
    if path.suffix == ".gguf" or not live.model_path.is_dir():
        return None
    for name in TOKENIZER_FILES:
        a, b = live.model_path / name, path / name
        if a.is_file() != b.is_file() or (a.is_file() and hash_file(a) != hash_file(b)):
            return None
    return live.tokenizer


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
