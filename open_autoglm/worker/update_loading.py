"""Reading a model folder for a live update: every tensor is hashed as it is staged.

A full swap fills a shadow model straight from the mapped safetensors (one pass: read, hash,
copy); a registry diff applied as a delta reads only the changed tensors. Either way nothing
reaches the staging copy before its bytes match manifest.json (worker/updates.py says what
happens to the staged values next).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from open_autoglm.registry.manifest import (
    FileEntry,
    Manifest,
    ShardEntry,
    TensorEntry,
    chat_template_hash,
    content_hash,
    folder_files,
    weight_files,
)
from open_autoglm.registry.safetensors_io import MappedFile, hash_bytes, hash_file
from open_autoglm.worker import transfer
from open_autoglm.worker.updates import UpdateError, check_shape, tensor_from_bytes
from open_autoglm.worker.weights import WeightMap, WeightTarget, place


@dataclass
class FolderLoad:
    manifest: Manifest      # the folder's manifest (checked), or one computed from what was read
    nbytes: int             # bytes read from the weight files


@torch.no_grad()
def load_verified(shadow: nn.Module, folder: Path, manifest: Manifest | None) -> FolderLoad:
    """Fill `shadow` from the safetensors of `folder`, hashing each tensor's bytes on the way.

    With a manifest, every tensor and model file must match it (else UpdateError "verify", naming
    them); without one, a manifest is computed from what was read, so later deltas can check
    their base. Missing or unexpected tensors and shape changes are "compat" errors."""
    weight_map = WeightMap(shadow)
    shards = weight_files(folder, folder_files(folder))
    if not shards:
        raise UpdateError("load", f"{folder}: no *.safetensors weight files")
    entries: dict[str, TensorEntry] = {}
    shard_entries: dict[str, ShardEntry] = {}
    loaded: set[str] = set()
    unexpected: list[str] = []
    bad: list[str] = []
    for rel in shards:
        try:
            mf = MappedFile(folder / rel)
        except Exception as e:  # RegistryError (bad header), OSError
            raise UpdateError("load", f"{folder / rel}: cannot read ({e})") from None
        with mf:
            shard_entries[rel] = ShardEntry(mf.header.header_hash, (folder / rel).stat().st_size)
            for info in mf.header.tensors.values():
                view = mf.view(info)
                entry = TensorEntry(rel, hash_bytes(view), info.shape, info.dtype, info.nbytes)
                entries[info.name] = entry
                want = manifest.tensors.get(info.name) if manifest is not None else entry
                if want is None or (want.hash, want.shape, want.dtype) != (entry.hash, entry.shape, entry.dtype):
                    bad.append(info.name)  # hashed, never staged
                else:
                    place(weight_map, info.name, tensor_from_bytes(view, info.dtype, info.shape), loaded,
                          unexpected, _copy_staged)
                del view  # views must be gone before the mapping closes
    if manifest is not None:
        bad += sorted(manifest.tensors.keys() - entries.keys())
        bad += verify_files(folder, manifest)
    if bad:
        raise UpdateError("verify", f"{folder}: hash mismatch against manifest.json for {_short(bad)}")
    missing = sorted(weight_map.expected_names() - loaded)
    if missing or unexpected:
        raise UpdateError("compat", f"{folder} does not fit the live model: "
                                    + "; ".join(([f"missing {_short(missing)}"] if missing else [])
                                                + ([f"unexpected {_short(unexpected)}"] if unexpected else [])))
    if manifest is None:
        manifest = _manifest_of(folder, shards, entries, shard_entries)
    return FolderLoad(manifest, sum(e.nbytes for e in entries.values()))


def _copy_staged(target: WeightTarget, key: str, tensor: torch.Tensor) -> None:
    check_shape(key, tuple(tensor.shape), target.view)  # an UpdateError ("compat"), not a load error
    transfer.copy(target.view, tensor)  # converts dtype and device; no pageable DMA (worker/transfer.py)


def verify_files(folder: Path, manifest: Manifest) -> list[str]:
    """Model files (config, tokenizer, ...) that are missing or differ, plus the manifest itself
    if it does not hash to its own manifest_hash."""
    bad = [rel for rel, f in sorted(manifest.files.items())
           if not (folder / rel).is_file() or hash_file(folder / rel) != f.hash]
    if manifest.content_hash() != manifest.manifest_hash:
        bad.append("manifest.json (does not hash to its manifest_hash)")
    return bad


def _manifest_of(folder: Path, shards: list[str], tensors: dict[str, TensorEntry],
                 shard_entries: dict[str, ShardEntry]) -> Manifest:
    files = {p: FileEntry(hash_file(folder / p), (folder / p).stat().st_size)
             for p in folder_files(folder) if p not in shards}
    template = chat_template_hash(folder)
    return Manifest(name="", version="", tensors=tensors, files=files, shards=shard_entries,
                    chat_template_hash=template, manifest_hash=content_hash(tensors, files, template))


def read_changed(folder: Path, manifest: Manifest, names: list[str]) -> Iterator[tuple[str, str, tuple, memoryview]]:
    """(name, dtype, shape, bytes) of `names` from a version folder, each hash-checked against
    `manifest` before it is yielded (a registry diff applied as a delta)."""
    by_file: dict[str, list[str]] = {}
    for name in names:
        by_file.setdefault(manifest.tensors[name].file, []).append(name)
    for rel, group in sorted(by_file.items()):
        with MappedFile(folder / rel) as mf:
            for name in group:
                info, want = mf.header.tensors.get(name), manifest.tensors[name]
                view = mf.view(info) if info is not None else None
                if view is None or hash_bytes(view) != want.hash:
                    raise UpdateError("verify", f"{folder / rel}: tensor {name} does not match its manifest hash")
                yield name, info.dtype, info.shape, view
                del view


def _short(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
