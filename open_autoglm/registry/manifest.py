"""Manifests: what a model folder holds, tensor by tensor and file by file, with content hashes.

A model folder is a Hugging Face folder. Its files fall in three groups:

| group        | which files                                                   | in the manifest            |
|--------------|---------------------------------------------------------------|----------------------------|
| weight files | files named by model.safetensors.index.json, else every       | `shards` (size, header     |
|              | top-level *.safetensors                                       | hash) + `tensors`          |
| layout files | *.safetensors.index.json (how tensors are split into shards)  | `files`, not content       |
| model files  | everything else (config, tokenizer, generation config, ...)   | `files`, part of content   |

Hidden files (names starting with ".") and a top-level manifest.json are ignored.

`manifest_hash` identifies the *content*: xxh3_128 (hex) of the UTF-8 canonical JSON
(`json.dumps(obj, sort_keys=True, separators=(",", ":"))`, ASCII) of

    {"format": 1,
     "tensors": [[name, dtype, shape, hash], ...]   sorted by name
     "files": [[path, hash], ...]                   model files only, sorted by path
     "chat_template": chat_template_hash or null}

Sharding, names, versions, parents, times and metrics are not content: two folders with the same
tensors (bytes, dtype, shape) and the same model files have the same manifest_hash.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from open_autoglm.registry.errors import RegistryError
from open_autoglm.registry.safetensors_io import MappedFile, hash_bytes, hash_file

FORMAT = "open-autoglm-manifest"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
INDEX_SUFFIX = ".safetensors.index.json"


@dataclass(frozen=True)
class TensorEntry:
    file: str  # shard path relative to the folder
    hash: str  # xxh3_128 hex of the raw bytes
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype string: F32, BF16, ...
    nbytes: int


@dataclass(frozen=True)
class FileEntry:
    hash: str  # xxh3_128 hex of the whole file
    nbytes: int


@dataclass(frozen=True)
class ShardEntry:
    header_hash: str  # xxh3_128 hex of the 8-byte length prefix + JSON header
    nbytes: int  # whole file size


@dataclass(frozen=True)
class Manifest:
    """One model version. Empty `name`/`version` for a folder outside the registry."""

    name: str
    version: str
    tensors: dict[str, TensorEntry]
    files: dict[str, FileEntry]
    shards: dict[str, ShardEntry]
    chat_template_hash: str | None
    manifest_hash: str
    parent: str | None = None
    created: str = ""  # UTC ISO 8601, e.g. 2025-01-31T12:00:00.123456Z
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def total_nbytes(self) -> int:
        """Bytes of all tensors."""
        return sum(t.nbytes for t in self.tensors.values())

    def content_hash(self) -> str:
        """Recompute manifest_hash from the entries (see the module docstring)."""
        return content_hash(self.tensors, self.files, self.chat_template_hash)

    def with_meta(self, **kwargs: Any) -> Manifest:
        """A copy with other name / version / parent / created / metrics."""
        return replace(self, **kwargs)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "version": self.version,
            "parent": self.parent,
            "created": self.created,
            "metrics": self.metrics,
            "manifest_hash": self.manifest_hash,
            "chat_template_hash": self.chat_template_hash,
            "files": {p: asdict(f) for p, f in sorted(self.files.items())},
            "shards": {p: asdict(s) for p, s in sorted(self.shards.items())},
            "tensors": {n: {**asdict(t), "shape": list(t.shape)} for n, t in sorted(self.tensors.items())},
        }

    @classmethod
    def from_json(cls, obj: Any, where: str = "manifest") -> Manifest:
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise RegistryError(f"{where}: not an {FORMAT} document")
        if obj.get("format_version") != FORMAT_VERSION:
            raise RegistryError(f"{where}: unsupported format_version {obj.get('format_version')!r}")
        try:
            tensors = {n: TensorEntry(**{**t, "shape": tuple(t["shape"])}) for n, t in obj["tensors"].items()}
            return cls(
                name=obj["name"],
                version=obj["version"],
                tensors=tensors,
                files={p: FileEntry(**f) for p, f in obj["files"].items()},
                shards={p: ShardEntry(**s) for p, s in obj["shards"].items()},
                chat_template_hash=obj["chat_template_hash"],
                manifest_hash=obj["manifest_hash"],
                parent=obj["parent"],
                created=obj["created"],
                metrics=obj["metrics"],
            )
        except (KeyError, TypeError, AttributeError) as e:
            raise RegistryError(f"{where}: malformed manifest ({type(e).__name__}: {e})") from None

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1, sort_keys=False) + "\n"

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Manifest:
        try:
            obj = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise RegistryError(f"{path}: cannot read manifest ({e})") from None
        return cls.from_json(obj, str(path))


def is_model_file(path: str) -> bool:
    """Part of manifest_hash: every non-weight file except the shard index (layout only)."""
    return not path.endswith(INDEX_SUFFIX)


def content_hash(
    tensors: dict[str, TensorEntry], files: dict[str, FileEntry], chat_template_hash: str | None
) -> str:
    obj = {
        "format": FORMAT_VERSION,
        "tensors": [[n, t.dtype, list(t.shape), t.hash] for n, t in sorted(tensors.items())],
        "files": [[p, f.hash] for p, f in sorted(files.items()) if is_model_file(p)],
        "chat_template": chat_template_hash,
    }
    return hash_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode())


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def folder_files(folder: Path) -> list[str]:
    """Relative paths (POSIX) of every regular file, hidden ones and manifest.json excepted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in filenames:
            rel = Path(dirpath, fn).relative_to(folder).as_posix()
            if not fn.startswith(".") and rel != MANIFEST_FILE:
                out.append(rel)
    return sorted(out)


def weight_files(folder: Path, paths: list[str]) -> list[str]:
    """Shards named by the index (model.safetensors.index.json), else all top-level *.safetensors."""
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return [p for p in paths if "/" not in p and p.endswith(".safetensors")]
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise RegistryError(f"{index}: bad shard index ({e})") from None
    missing = [s for s in shards if s not in paths]
    if missing:
        raise RegistryError(f"{index}: names missing shard file(s): {', '.join(missing)}")
    return shards


def scan_shard(folder: Path, rel: str) -> tuple[ShardEntry, dict[str, TensorEntry]]:
    """Header hash and per-tensor hashes of one safetensors file."""
    with MappedFile(folder / rel) as mf:
        tensors = {
            t.name: TensorEntry(rel, mf.hash_tensor(t), t.shape, t.dtype, t.nbytes)
            for t in mf.header.tensors.values()
        }
        return ShardEntry(mf.header.header_hash, (folder / rel).stat().st_size), tensors


def chat_template_hash(folder: Path) -> str | None:
    """Hash of the chat template: chat_template.jinja, else chat_template.json, else tokenizer_config.json."""
    if (folder / "chat_template.jinja").is_file():
        return hash_bytes((folder / "chat_template.jinja").read_bytes())
    for fn in ("chat_template.json", "tokenizer_config.json"):
        path = folder / fn
        if path.is_file():
            try:
                template = json.loads(path.read_text()).get("chat_template")
            except (ValueError, AttributeError) as e:
                raise RegistryError(f"{path}: not a JSON object ({e})") from None
            if isinstance(template, str):
                return hash_bytes(template.encode())
            if template is not None:  # a list of {"name", "template"}
                return hash_bytes(json.dumps(template, sort_keys=True, separators=(",", ":")).encode())
    return None


def compute_manifest(
    folder: str | os.PathLike[str],
    *,
    name: str = "",
    version: str = "",
    parent: str | None = None,
    metrics: dict[str, Any] | None = None,
    created: str | None = None,
) -> Manifest:
    """Hash every tensor and file of a model folder (in the registry or not)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise RegistryError(f"{folder}: not a folder")
    paths = folder_files(folder)
    shards = weight_files(folder, paths)
    shard_entries: dict[str, ShardEntry] = {}
    tensors: dict[str, TensorEntry] = {}
    for rel in shards:
        shard_entries[rel], found = scan_shard(folder, rel)
        for dup in found.keys() & tensors.keys():
            raise RegistryError(f"{folder}: tensor {dup} is in both {tensors[dup].file} and {rel}")
        tensors.update(found)
    _check_index(folder, tensors)
    files = {
        p: FileEntry(hash_file(folder / p), (folder / p).stat().st_size) for p in paths if p not in shards
    }
    template = chat_template_hash(folder)
    return Manifest(
        name=name,
        version=version,
        tensors=tensors,
        files=files,
        shards=shard_entries,
        chat_template_hash=template,
        manifest_hash=content_hash(tensors, files, template),
        parent=parent,
        created=created or utc_now(),
        metrics=dict(metrics or {}),
    )


def _check_index(folder: Path, tensors: dict[str, TensorEntry]) -> None:
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return
    weight_map = json.loads(index.read_text())["weight_map"]
    wrong = [n for n, f in weight_map.items() if n not in tensors or tensors[n].file != f]
    wrong += [n for n in tensors if n not in weight_map]
    if wrong:
        raise RegistryError(
            f"{index}: weight_map disagrees with the shards for {len(wrong)} tensor(s), e.g. {wrong[0]}"
        )


@dataclass(frozen=True)
class Mismatch:
    """One difference between a folder and its manifest. kind: manifest | shard | tensor | file."""

    kind: str
    name: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind} {self.name}: {self.detail}"


@dataclass(frozen=True)
class VerifyResult:
    name: str
    version: str
    num_tensors: int  # tensors re-hashed
    num_files: int  # files re-hashed (shards included)
    mismatches: list[Mismatch]

    @property
    def ok(self) -> bool:
        return not self.mismatches


def verify_folder(folder: str | os.PathLike[str], manifest: Manifest) -> VerifyResult:
    """Re-hash every tensor and file of `folder` and compare with `manifest`; lists all mismatches."""
    folder = Path(folder)
    bad: list[Mismatch] = []
    if manifest.content_hash() != manifest.manifest_hash:
        bad.append(Mismatch("manifest", "manifest_hash", "does not match the manifest's own entries"))
    num_tensors = _verify_shards(folder, manifest, bad)
    _verify_files(folder, manifest, bad)
    num_files = len(manifest.files) + len(manifest.shards)
    return VerifyResult(manifest.name, manifest.version, num_tensors, num_files, bad)


def _verify_shards(folder: Path, manifest: Manifest, bad: list[Mismatch]) -> int:
    num_tensors = 0
    for rel, expected in sorted(manifest.shards.items()):
        try:
            shard, found = scan_shard(folder, rel)
        except (OSError, RegistryError) as e:
            bad.append(Mismatch("shard", rel, f"unreadable ({e})"))
            continue
        num_tensors += len(found)
        if shard != expected:
            bad.append(Mismatch("shard", rel, f"header/size {shard} != expected {expected}"))
        wanted = {n for n, t in manifest.tensors.items() if t.file == rel}
        for n in sorted(found.keys() - wanted):
            bad.append(Mismatch("tensor", n, f"unexpected tensor in {rel}"))
        for n in sorted(wanted):
            got, want = found.get(n), manifest.tensors[n]
            if got is None:
                bad.append(Mismatch("tensor", n, f"missing from {rel}"))
            elif got != want:
                bad.append(Mismatch("tensor", n, _entry_diff(got, want)))
    for n in sorted(n for n, t in manifest.tensors.items() if t.file not in manifest.shards):
        bad.append(Mismatch("tensor", n, f"its file {manifest.tensors[n].file} is not a listed shard"))
    return num_tensors


def _verify_files(folder: Path, manifest: Manifest, bad: list[Mismatch]) -> None:
    present = set(folder_files(folder)) if folder.is_dir() else set()
    for rel, expected in sorted(manifest.files.items()):
        if rel not in present:
            bad.append(Mismatch("file", rel, "missing"))
            continue
        got = FileEntry(hash_file(folder / rel), (folder / rel).stat().st_size)
        if got != expected:
            bad.append(Mismatch("file", rel, f"hash {got.hash} != expected {expected.hash}"))
    for rel in sorted(present - manifest.files.keys() - manifest.shards.keys()):
        bad.append(Mismatch("file", rel, "not in the manifest"))


def _entry_diff(got: TensorEntry, want: TensorEntry) -> str:
    if (got.dtype, got.shape) != (want.dtype, want.shape):
        return f"{got.dtype}{list(got.shape)} != expected {want.dtype}{list(want.shape)}"
    return f"hash {got.hash} != expected {want.hash}"
