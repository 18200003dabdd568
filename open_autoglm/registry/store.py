"""The registry on disk: immutable version folders, aliases, garbage collection.

    <root>/<name>/versions/<version>/   a Hugging Face folder + manifest.json, read-only (0444/0555)
    <root>/<name>/aliases.json          {"stable": "v3", "canary": "v4"}
    <root>/<name>/.staging/             folders being written; renamed into versions/ when complete
    <root>/<name>/.lock                 flock held while choosing ids, renaming, editing aliases, gc

A version folder appears in one rename, complete with its manifest, or not at all. Readers take
no lock: version folders never change once they exist.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import stat
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from open_autoglm.registry.delta import build_from_delta, read_delta, write_delta
from open_autoglm.registry.diff import Diff, diff_manifests
from open_autoglm.registry.errors import DeltaError, RegistryError
from open_autoglm.registry.manifest import (
    MANIFEST_FILE,
    Manifest,
    VerifyResult,
    compute_manifest,
    folder_files,
    verify_folder,
)

DEFAULT_ROOT = "~/.cache/open-autoglm/registry"
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # model names and version ids
_ALIAS = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,63}")
_AUTO = re.compile(r"v(\d+)")
STALE_STAGING_S = 3600.0  # gc removes staging folders older than this (left by a killed process)


def _natural(s: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", s)]


class Registry:
    """Versions of models under one root folder (default ~/.cache/open-autoglm/registry)."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root if root is not None else DEFAULT_ROOT).expanduser()

    # -- reading -----------------------------------------------------------------------------

    def names(self) -> list[str]:
        """Models with a versions/ folder under the root."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / "versions").is_dir())

    def list_versions(self, name: str) -> list[Manifest]:
        """Manifests of every version, oldest first (by created time, then version id)."""
        versions = self._model_dir(name, must_exist=True) / "versions"
        found = [
            Manifest.load(p / MANIFEST_FILE) for p in versions.iterdir() if (p / MANIFEST_FILE).is_file()
        ]
        return sorted(found, key=lambda m: (m.created, _natural(m.version)))

    def aliases(self, name: str) -> dict[str, str]:
        path = self._model_dir(name) / "aliases.json"
        try:
            return dict(sorted(json.loads(path.read_text()).items())) if path.is_file() else {}
        except (OSError, ValueError, AttributeError) as e:
            raise RegistryError(f"{path}: unreadable aliases ({e})") from None

    def resolve(self, name: str, version_or_alias: str) -> Path:
        """Folder of a version, given its id or an alias."""
        versions = self._model_dir(name, must_exist=True) / "versions"
        for candidate in (version_or_alias, self.aliases(name).get(version_or_alias)):
            if candidate and _ID.fullmatch(candidate) and (versions / candidate / MANIFEST_FILE).is_file():
                return versions / candidate
        known = [m.version for m in self.list_versions(name)] + list(self.aliases(name))
        raise RegistryError(
            f"{name}: no version or alias {version_or_alias!r} (known: {', '.join(known) or 'none'})"
        )

    def show(self, name: str, version: str) -> Manifest:
        return Manifest.load(self.resolve(name, version) / MANIFEST_FILE)

    def verify(self, name: str, version: str) -> VerifyResult:
        """Re-hash every tensor and file of a version and compare with its manifest."""
        folder = self.resolve(name, version)
        manifest = Manifest.load(folder / MANIFEST_FILE)
        return verify_folder(folder, manifest)

    def diff(self, name: str, v1: str, v2: str) -> Diff:
        return diff_manifests(self.show(name, v1), self.show(name, v2))

    # -- writing -----------------------------------------------------------------------------

    def publish(
        self,
        name: str,
        path: str | os.PathLike[str],
        version: str | None = None,
        parent: str | None = None,
        metrics: dict[str, Any] | None = None,
    ) -> Manifest:
        """Copy a model folder into a new immutable version (auto id v1, v2, ... when None)."""
        src = Path(path).expanduser()
        if not src.is_dir():
            raise RegistryError(f"{src}: not a folder")
        self._check_new_version(name, version)
        parent_id = self.show(name, parent).version if parent is not None else None
        metrics = _check_metrics(metrics)
        with self._staging(name) as staging:
            for rel in folder_files(src):
                (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src / rel, staging / rel)
            manifest = compute_manifest(staging, name=name, parent=parent_id, metrics=metrics)
            if not manifest.tensors:
                raise RegistryError(f"{src}: no tensors found (expected *.safetensors files)")
            return self._commit(name, staging, manifest, version)

    def make_delta(self, name: str, v1: str, v2: str, out_file: str | os.PathLike[str]) -> Diff:
        """Write a delta package taking v1 to v2 (only changed tensors); returns what it holds."""
        base, target = self.show(name, v1), self.show(name, v2)
        return write_delta(base, target, self.resolve(name, v2), out_file)

    def apply_delta(
        self,
        name: str,
        base_version: str,
        delta_file: str | os.PathLike[str],
        new_version: str | None = None,
        metrics: dict[str, Any] | None = None,
    ) -> Manifest:
        """Build a new version from base + delta. All checks pass or nothing is written.

        metrics default to the target manifest's; parent is the base version.
        """
        self._check_new_version(name, new_version)
        base_dir = self.resolve(name, base_version)
        base = Manifest.load(base_dir / MANIFEST_FILE)
        with read_delta(delta_file) as pkg, self._staging(name) as staging:
            build_from_delta(base_dir, base, pkg, staging)
            target = pkg.target_manifest
            chosen = _check_metrics(metrics) if metrics is not None else target.metrics
            manifest = compute_manifest(staging, name=name, parent=base.version, metrics=chosen)
            if manifest.manifest_hash != target.manifest_hash:
                raise DeltaError(
                    f"{delta_file}: result hashes to {manifest.manifest_hash}, delta promised {target.manifest_hash}"
                    f" (is base {base.version} intact? run verify)"
                )
            return self._commit(name, staging, manifest, new_version)

    def set_alias(self, name: str, alias: str, version: str) -> None:
        """Point `alias` (stable, canary, any word) at a version (given by id or by another alias)."""
        if not _ALIAS.fullmatch(alias):
            raise RegistryError(
                f"alias {alias!r}: use a word (letters, digits, . _ -), starting with a letter"
            )
        self._model_dir(name, must_exist=True)
        with self._lock(name):
            target = self.show(name, version).version
            if (self._model_dir(name) / "versions" / alias).exists():
                raise RegistryError(f"{name}: {alias!r} is a version id, it cannot also be an alias")
            self._write_aliases(name, {**self.aliases(name), alias: target})

    def remove_alias(self, name: str, alias: str) -> None:
        self._model_dir(name, must_exist=True)
        with self._lock(name):
            aliases = self.aliases(name)
            if aliases.pop(alias, None) is None:
                raise RegistryError(f"{name}: no alias {alias!r}")
            self._write_aliases(name, aliases)

    def gc(self, name: str, keep: int = 3, dry_run: bool = False) -> list[str]:
        """Remove versions that are neither aliased nor among the newest `keep`; returns their ids."""
        if keep < 0:
            raise RegistryError(f"keep must be >= 0, got {keep}")
        self._model_dir(name, must_exist=True)
        with self._lock(name):
            ids = [m.version for m in self.list_versions(name)]
            protected = set(self.aliases(name).values()) | set(ids[len(ids) - keep :] if keep else [])
            removed = [v for v in ids if v not in protected]
            if dry_run:
                return removed
            model_dir = self._model_dir(name)
            for v in removed:  # rename first, so a version vanishes in one step
                doomed = model_dir / ".staging" / f"gc-{v}-{uuid.uuid4().hex[:8]}"
                doomed.parent.mkdir(exist_ok=True)
                _make_writable(model_dir / "versions" / v)
                os.rename(model_dir / "versions" / v, doomed)
                _rmtree(doomed)
            for stale in (model_dir / ".staging").glob("*") if (model_dir / ".staging").is_dir() else []:
                if time.time() - stale.stat().st_mtime > STALE_STAGING_S:
                    _rmtree(stale)
            return removed

    # -- internals ---------------------------------------------------------------------------

    def _model_dir(self, name: str, must_exist: bool = False) -> Path:
        if not _ID.fullmatch(name):
            hint = " (replace '/' with '--')" if "/" in name else ""
            raise RegistryError(f"model name {name!r}: use letters, digits, . _ -{hint}")
        path = self.root / name
        if must_exist and not (path / "versions").is_dir():
            raise RegistryError(f"no model {name!r} in registry {self.root}")
        return path

    def _check_new_version(self, name: str, version: str | None) -> None:
        if version is None:
            return
        if not _ID.fullmatch(version):
            raise RegistryError(f"version id {version!r}: use letters, digits, . _ - (e.g. v7, 2025-01-31)")
        if (self._model_dir(name) / "versions" / version).exists():
            raise RegistryError(f"{name}: version {version} already exists (versions are immutable)")
        if version in self.aliases(name):
            raise RegistryError(f"{name}: {version!r} is an alias, it cannot also be a version id")

    @contextlib.contextmanager
    def _lock(self, name: str) -> Iterator[None]:
        model_dir = self._model_dir(name)
        model_dir.mkdir(parents=True, exist_ok=True)
        with open(model_dir / ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def _staging(self, name: str) -> Iterator[Path]:
        """A fresh folder on the registry's filesystem; removed on exit unless committed."""
        path = self._model_dir(name) / ".staging" / uuid.uuid4().hex
        path.mkdir(parents=True)
        try:
            yield path
        finally:
            if path.exists():
                _rmtree(path)

    def _commit(self, name: str, staging: Path, manifest: Manifest, version: str | None) -> Manifest:
        """Give the staged folder its id and manifest, make it read-only, rename it into versions/."""
        with self._lock(name):
            versions = self._model_dir(name) / "versions"
            versions.mkdir(exist_ok=True)
            if version is None:
                taken = [int(m.group(1)) for p in versions.iterdir() if (m := _AUTO.fullmatch(p.name))]
                version = f"v{max(taken, default=0) + 1}"
            self._check_new_version(name, version)
            manifest = manifest.with_meta(name=name, version=version)
            (staging / MANIFEST_FILE).write_text(manifest.dumps())
            _make_read_only(staging)
            os.rename(staging, versions / version)
        return manifest

    def _write_aliases(self, name: str, aliases: dict[str, str]) -> None:
        path = self._model_dir(name) / "aliases.json"
        tmp = path.with_name(f".aliases.json.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(dict(sorted(aliases.items())), indent=1) + "\n")
        os.replace(tmp, path)


def _check_metrics(metrics: dict[str, Any] | None) -> dict[str, Any]:
    if metrics is None:
        return {}
    if not isinstance(metrics, dict):
        raise RegistryError(f"metrics must be a JSON object (a dict), got {type(metrics).__name__}")
    try:
        return json.loads(json.dumps(metrics))
    except (TypeError, ValueError) as e:
        raise RegistryError(f"metrics must be JSON-serializable ({e})") from None


def _make_read_only(folder: Path) -> None:
    for dirpath, _, filenames in os.walk(folder):
        for fn in filenames:
            os.chmod(Path(dirpath, fn), 0o444)
    for dirpath, _, _ in os.walk(folder, topdown=False):
        os.chmod(dirpath, 0o555)


def _make_writable(folder: Path) -> None:
    """Folders only: files may be hard-linked into other versions and must stay read-only."""
    for dirpath, _, _ in os.walk(folder):
        os.chmod(dirpath, os.stat(dirpath).st_mode | stat.S_IWUSR)


def _rmtree(folder: Path) -> None:
    _make_writable(folder)
    shutil.rmtree(folder)


# -- module-level API: each call works on Registry(root) -------------------------------------

PathLike = str | os.PathLike[str]


def publish(
    name: str,
    path: PathLike,
    version: str | None = None,
    parent: str | None = None,
    metrics: dict[str, Any] | None = None,
    *,
    root: PathLike | None = None,
) -> Manifest:
    return Registry(root).publish(name, path, version, parent, metrics)


def list_versions(name: str, *, root: PathLike | None = None) -> list[Manifest]:
    return Registry(root).list_versions(name)


def show(name: str, version: str, *, root: PathLike | None = None) -> Manifest:
    return Registry(root).show(name, version)


def verify(name: str, version: str, *, root: PathLike | None = None) -> VerifyResult:
    return Registry(root).verify(name, version)


def set_alias(name: str, alias: str, version: str, *, root: PathLike | None = None) -> None:
    Registry(root).set_alias(name, alias, version)


def resolve(name: str, version_or_alias: str, *, root: PathLike | None = None) -> Path:
    return Registry(root).resolve(name, version_or_alias)


def gc(name: str, keep: int = 3, dry_run: bool = False, *, root: PathLike | None = None) -> list[str]:
    return Registry(root).gc(name, keep, dry_run)


def diff(name: str, v1: str, v2: str, *, root: PathLike | None = None) -> Diff:
    return Registry(root).diff(name, v1, v2)


def make_delta(name: str, v1: str, v2: str, out_file: PathLike, *, root: PathLike | None = None) -> Diff:
    return Registry(root).make_delta(name, v1, v2, out_file)


def apply_delta(
    name: str,
    base_version: str,
    delta_file: PathLike,
    new_version: str | None = None,
    metrics: dict[str, Any] | None = None,
    *,
    root: PathLike | None = None,
) -> Manifest:
    return Registry(root).apply_delta(name, base_version, delta_file, new_version, metrics)
