"""Delta packages: one safetensors file carrying only the tensors (and model files) that changed.

Layout of a delta file (a valid safetensors file; any safetensors reader can open it):

| part                    | content                                                                  |
|-------------------------|--------------------------------------------------------------------------|
| tensors `<name>`        | new bytes of each changed tensor, same dtype/shape as in the base        |
| tensors `__file__/<p>`  | U8 [nbytes]: new content of a changed or added model file (config, ...)  |
| `__metadata__`          | format = "open-autoglm-delta", format_version = "1",                     |
|                         | base_manifest_hash, target_manifest_hash,                                |
|                         | target_manifest = the target's manifest.json (JSON text),                |
|                         | removed_files = JSON list of model files the target no longer has        |

Deltas are for same-architecture fine-tunes: the base and the target have the same tensor names,
shapes and dtypes, so the receiver can copy new values into weights it already holds.
Every tensor's hash is checked against the target manifest before anything is applied.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import xxhash

from open_autoglm.registry.diff import Diff, diff_manifests
from open_autoglm.registry.errors import DeltaError, RegistryError
from open_autoglm.registry.manifest import Manifest
from open_autoglm.registry.safetensors_io import MappedFile, TensorInfo, WriteEntry, write_safetensors

DELTA_FORMAT = "open-autoglm-delta"
DELTA_FORMAT_VERSION = "1"
FILE_PREFIX = "__file__/"


def write_delta(
    base: Manifest, target: Manifest, target_folder: Path, out_file: str | os.PathLike[str]
) -> Diff:
    """Write the delta base -> target; bytes come from `target_folder` and are re-hashed on the way."""
    diff = diff_manifests(base, target)
    refusals = diff.delta_refusals()
    if refusals:
        more = f" (and {len(refusals) - 3} more)" if len(refusals) > 3 else ""
        raise DeltaError(
            f"cannot make a delta {base.version or base.manifest_hash[:12]} -> {target.version or target.manifest_hash[:12]}: "
            f"a delta only carries new values of existing tensors (same-architecture fine-tunes); "
            f"{'; '.join(refusals[:3])}{more}. Publish the new version in full instead."
        )
    out_file = Path(out_file)
    shards = {target.tensors[c.name].file for c in diff.changed}
    mapped = {rel: MappedFile(target_folder / rel) for rel in sorted(shards)}
    tmp = out_file.with_name(f".{out_file.name}.tmp-{os.getpid()}")
    try:
        entries = [_tensor_entry(mapped[target.tensors[c.name].file], c.name, target) for c in diff.changed]
        for rel in diff.files_changed + diff.files_added:
            data = (target_folder / rel).read_bytes()
            if xxhash.xxh3_128_hexdigest(data) != target.files[rel].hash:
                raise DeltaError(f"{target_folder / rel}: content does not match its manifest (run verify)")
            entries.append(WriteEntry(FILE_PREFIX + rel, "U8", (len(data),), len(data), data))
        metadata = {
            "format": DELTA_FORMAT,
            "format_version": DELTA_FORMAT_VERSION,
            "base_manifest_hash": base.manifest_hash,
            "target_manifest_hash": target.manifest_hash,
            "target_manifest": json.dumps(target.to_json(), separators=(",", ":")),
            "removed_files": json.dumps(diff.files_removed),
        }
        with open(tmp, "wb") as f:
            write_safetensors(f, entries, metadata)
        os.replace(tmp, out_file)
    finally:
        tmp.unlink(missing_ok=True)
        for mf in mapped.values():
            mf.close()
    return diff


def _tensor_entry(mf: MappedFile, name: str, target: Manifest) -> WriteEntry:
    info, want = mf.header.tensors.get(name), target.tensors[name]
    if info is None or (info.shape, info.dtype) != (want.shape, want.dtype):
        raise DeltaError(f"{mf.path}: tensor {name} does not match its manifest (run verify)")

    def chunks() -> Iterator[memoryview]:
        h = xxhash.xxh3_128()
        for chunk in mf.chunks(info):
            h.update(chunk)
            yield chunk
        if h.hexdigest() != want.hash:
            raise DeltaError(f"{mf.path}: tensor {name} does not match its manifest hash (run verify)")

    return WriteEntry(name, info.dtype, info.shape, info.nbytes, chunks)


class DeltaTensor(NamedTuple):
    name: str
    dtype: str  # safetensors dtype string: F32, BF16, ...
    shape: tuple[int, ...]
    data: memoryview  # raw little-endian bytes, a view into the delta file (valid until close())


class DeltaPackage:
    """An opened delta file. Opening checks the header and the embedded target manifest
    (unknown tensors, shape/dtype changes, truncation); `verify()` hashes every tensor and file
    against the target manifest. An update must be all-or-nothing, so `tensors()` and `files()`
    verify the whole package before yielding anything unless told otherwise.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            self._mf = MappedFile(self.path)
        except RegistryError as e:
            raise DeltaError(f"not a readable delta package: {e}") from None
        except OSError as e:
            raise DeltaError(f"{self.path}: cannot open ({e})") from None
        self._verified = False
        try:
            self._read_metadata()
            self._check_entries()
        except BaseException:
            self._mf.close()
            raise

    def _read_metadata(self) -> None:
        meta = self._mf.header.metadata
        if meta.get("format") != DELTA_FORMAT:
            raise DeltaError(f"{self.path}: not an {DELTA_FORMAT} file")
        if meta.get("format_version") != DELTA_FORMAT_VERSION:
            raise DeltaError(f"{self.path}: unsupported delta format_version {meta.get('format_version')!r}")
        try:
            self.base_manifest_hash: str = meta["base_manifest_hash"]
            self.target_manifest_hash: str = meta["target_manifest_hash"]
            self.removed_files: list[str] = json.loads(meta["removed_files"])
            target = json.loads(meta["target_manifest"])
        except (KeyError, ValueError) as e:
            raise DeltaError(f"{self.path}: malformed delta metadata ({e})") from None
        try:
            self.target_manifest: Manifest = Manifest.from_json(target, f"{self.path}: target manifest")
        except RegistryError as e:
            raise DeltaError(str(e)) from None
        m = self.target_manifest
        if not (m.manifest_hash == m.content_hash() == self.target_manifest_hash):
            raise DeltaError(f"{self.path}: embedded target manifest does not hash to target_manifest_hash")

    def _check_entries(self) -> None:
        m = self.target_manifest
        self.tensor_names: list[str] = []
        self.file_names: list[str] = []
        for info in self._mf.header.tensors.values():
            if info.name.startswith(FILE_PREFIX):
                rel = info.name[len(FILE_PREFIX) :]
                if rel not in m.files or info.dtype != "U8" or info.nbytes != m.files[rel].nbytes:
                    raise DeltaError(
                        f"{self.path}: file entry {rel} is not a model file of the target manifest"
                    )
                self.file_names.append(rel)
                continue
            want = m.tensors.get(info.name)
            if want is None:
                raise DeltaError(f"{self.path}: unknown tensor {info.name} (not in the target manifest)")
            if (info.shape, info.dtype) != (want.shape, want.dtype):
                raise DeltaError(
                    f"{self.path}: tensor {info.name} is {info.dtype}{list(info.shape)} but the target manifest "
                    f"says {want.dtype}{list(want.shape)} (shape/dtype changes are not deltas)"
                )
            self.tensor_names.append(info.name)

    @property
    def nbytes(self) -> int:
        """Payload bytes (tensors + files)."""
        return self._mf.header.data_len

    def check_base(self, manifest_hash: str) -> None:
        """Refuse a base whose manifest hash is not the one this delta was made from."""
        if manifest_hash != self.base_manifest_hash:
            raise DeltaError(
                f"{self.path}: wrong base: delta was made from manifest {self.base_manifest_hash}, "
                f"this version is {manifest_hash}"
            )

    def verify(self) -> None:
        """Hash every tensor and file against the target manifest; raises DeltaError listing all mismatches."""
        bad = [
            name for name, info in self._infos() if self._mf.hash_tensor(info) != self._expected_hash(name)
        ]
        if bad:
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise DeltaError(f"{self.path}: corrupt: hash mismatch for {shown}")
        self._verified = True

    def tensors(self, verify: bool = True) -> Iterator[DeltaTensor]:
        """(name, dtype, shape, bytes view) of each changed tensor.

        With verify (the default) every byte of the package is checked before the first tensor
        is yielded (once: a passed verify() is remembered), so a corrupt package yields nothing.
        """
        if verify and not self._verified:
            self.verify()
        for name, info in self._infos():
            if not name.startswith(FILE_PREFIX):
                yield DeltaTensor(name, info.dtype, info.shape, self._mf.view(info))

    def files(self, verify: bool = True) -> Iterator[tuple[str, bytes]]:
        """(relative path, content) of each changed or added model file; checked like tensors()."""
        if verify and not self._verified:
            self.verify()
        for name, info in self._infos():
            if name.startswith(FILE_PREFIX):
                yield name[len(FILE_PREFIX) :], bytes(self._mf.view(info))

    def _infos(self) -> Iterable[tuple[str, TensorInfo]]:
        return self._mf.header.tensors.items()

    def _expected_hash(self, name: str) -> str:
        m = self.target_manifest
        return (
            m.files[name[len(FILE_PREFIX) :]].hash if name.startswith(FILE_PREFIX) else m.tensors[name].hash
        )

    def close(self) -> None:
        self._mf.close()

    def __enter__(self) -> DeltaPackage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_delta(delta_file: str | os.PathLike[str]) -> DeltaPackage:
    """Open a delta package (header and target manifest checked; see DeltaPackage.verify for bytes)."""
    return DeltaPackage(delta_file)


def build_from_delta(base_folder: Path, base: Manifest, pkg: DeltaPackage, out: Path) -> None:
    """Fill the empty folder `out` with base + delta, keeping the base's shard layout.

    Checks everything first (base hash, every delta byte, same tensor set and shapes) so that a
    refused delta writes nothing. Unchanged files are hard-linked (both are read-only) or copied.
    """
    pkg.check_base(base.manifest_hash)
    pkg.verify()
    target = pkg.target_manifest
    if target.tensors.keys() != base.tensors.keys():
        odd = sorted(target.tensors.keys() ^ base.tensors.keys())
        raise DeltaError(
            f"{pkg.path}: tensor set differs from the base ({len(odd)} tensor(s), e.g. {odd[0]})"
        )
    delta_views = {t.name: t for t in pkg.tensors(verify=False)}
    for name, want in target.tensors.items():
        have = base.tensors[name]
        if (have.shape, have.dtype) != (want.shape, want.dtype):
            raise DeltaError(f"{pkg.path}: tensor {name} changes shape/dtype {have.dtype}{list(have.shape)} -> "
                             f"{want.dtype}{list(want.shape)}")  # fmt: skip
        if have.hash != want.hash and name not in delta_views:
            raise DeltaError(f"{pkg.path}: incomplete: tensor {name} changed but the delta does not carry it")
    new_files = dict(pkg.files(verify=False))
    for rel in base.files.keys() | new_files.keys():
        if rel in pkg.removed_files:
            continue
        dst = out / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if rel in new_files:
            dst.write_bytes(new_files[rel])
        else:
            _link_or_copy(base_folder / rel, dst)
    for rel in base.shards:
        changed = [n for n, t in base.tensors.items() if t.file == rel and n in delta_views]
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        if changed:
            _patch_shard(base_folder / rel, out / rel, {n: delta_views[n].data for n in changed})
        else:
            _link_or_copy(base_folder / rel, out / rel)
    delta_views.clear()


def _patch_shard(src: Path, dst: Path, new_bytes: dict[str, memoryview]) -> None:
    """Copy `src` to `dst` replacing the bytes of some tensors; header and offsets stay the same."""
    with MappedFile(src) as mf, open(dst, "wb") as f:
        with open(src, "rb") as raw:
            f.write(raw.read(mf.header.data_start))  # the header, verbatim
        for info in mf.header.tensors.values():  # in data order
            if info.name in new_bytes:
                f.write(new_bytes[info.name])
            else:
                for chunk in mf.chunks(info):
                    f.write(chunk)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
