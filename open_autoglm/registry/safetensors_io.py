"""Read, hash and write safetensors files without torch.

Format (https://github.com/huggingface/safetensors):

| bytes            | content                                                                |
|------------------|------------------------------------------------------------------------|
| 0 .. 8           | N, the header length, unsigned 64-bit little-endian                    |
| 8 .. 8+N         | JSON {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__"} |
| 8+N .. end       | raw tensor bytes; offsets are relative to 8+N, contiguous, no gaps     |

Every byte of a valid file is covered either by the header or by exactly one tensor, so
hashing the header and each tensor checks the whole file. Tensor bytes are hashed with
xxh3_128 through an mmap, in chunks whose pages are dropped after use: peak memory stays small
whatever the tensor size.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import xxhash

from open_autoglm.registry.errors import RegistryError

# Bytes per element of each safetensors dtype string.
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}  # fmt: skip
MAX_HEADER_LEN = 100 * 1024 * 1024  # the limit of the reference implementation
CHUNK_BYTES = 32 * 1024 * 1024  # hashing / copying granularity
_PAGE = mmap.PAGESIZE


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors header; `begin`/`end` are offsets into the data region."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class SafetensorsHeader:
    """The parsed, validated header of one file. `data_start` = 8 + header length."""

    tensors: dict[str, TensorInfo]  # in data order
    metadata: dict[str, str]
    data_start: int
    header_hash: str  # xxh3_128 of bytes 0 .. data_start (length prefix + JSON)

    @property
    def data_len(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def hash_bytes(data: bytes | memoryview) -> str:
    return xxhash.xxh3_128_hexdigest(data)


def hash_file(path: Path) -> str:
    """xxh3_128 of a whole (small, non-weight) file, read in chunks."""
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


def read_header(f: BinaryIO, file_size: int, where: str) -> SafetensorsHeader:
    """Parse and validate the header of an open file; `where` names the file in errors."""
    f.seek(0)
    prefix = f.read(8)
    if len(prefix) < 8:
        raise RegistryError(f"{where}: not a safetensors file (shorter than 8 bytes)")
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len > MAX_HEADER_LEN or 8 + header_len > file_size:
        raise RegistryError(
            f"{where}: header length {header_len} does not fit a {file_size}-byte file (truncated?)"
        )
    raw = f.read(header_len)
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RegistryError(f"{where}: header is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise RegistryError(f"{where}: header is not a JSON object")
    metadata = obj.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise RegistryError(f"{where}: __metadata__ must map strings to strings")
    tensors = sorted(
        (_tensor_info(name, spec, where) for name, spec in obj.items()), key=lambda t: (t.begin, t.end)
    )
    data_start = 8 + header_len
    pos = 0
    for t in tensors:  # contiguous, no gaps, no overlaps
        if t.begin != pos:
            raise RegistryError(
                f"{where}: tensor {t.name} starts at {t.begin}, expected {pos} (gap or overlap)"
            )
        pos = t.end
    if data_start + pos != file_size:
        raise RegistryError(
            f"{where}: header describes {pos} data bytes but the file holds {file_size - data_start}"
            + (" (truncated)" if data_start + pos > file_size else " (trailing bytes)")
        )
    return SafetensorsHeader({t.name: t for t in tensors}, metadata, data_start, hash_bytes(prefix + raw))


def _tensor_info(name: str, spec: object, where: str) -> TensorInfo:
    if not isinstance(spec, dict):
        raise RegistryError(f"{where}: entry {name!r} is not an object")
    dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise RegistryError(f"{where}: tensor {name}: unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise RegistryError(f"{where}: tensor {name}: bad shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise RegistryError(f"{where}: tensor {name}: bad data_offsets {offsets!r}")
    begin, end = offsets
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if begin < 0 or end - begin != expected:
        raise RegistryError(
            f"{where}: tensor {name}: {dtype}{shape} needs {expected} bytes, offsets give {end - begin}"
        )
    return TensorInfo(name, dtype, tuple(shape), begin, end)


class MappedFile:
    """A safetensors file opened read-only: validated header + an mmap of the whole file.

    Views returned by `view()` point into the mapping; release them before `close()`
    (a mapping with live views is closed when the last view goes away).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._file = open(self.path, "rb")
        try:
            size = os.fstat(self._file.fileno()).st_size
            self.header = read_header(self._file, size, str(self.path))
            self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        except BaseException:
            self._file.close()
            raise

    def view(self, info: TensorInfo) -> memoryview:
        start = self.header.data_start + info.begin
        if self._mm is None or info.nbytes == 0:
            return memoryview(b"")
        return memoryview(self._mm)[start : start + info.nbytes]

    def hash_tensor(self, info: TensorInfo) -> str:
        """xxh3_128 of the tensor's raw bytes, streamed chunk by chunk."""
        h = xxhash.xxh3_128()
        for chunk in self.chunks(info):
            h.update(chunk)
        return h.hexdigest()

    def chunks(self, info: TensorInfo) -> Iterable[memoryview]:
        """The tensor's bytes as successive views; pages already consumed are dropped."""
        start = self.header.data_start + info.begin
        stop = start + info.nbytes
        if self._mm is None or start == stop:
            return
        with memoryview(self._mm) as whole:
            for pos in range(start, stop, CHUNK_BYTES):
                end = min(stop, pos + CHUNK_BYTES)
                with whole[pos:end] as chunk:
                    yield chunk
                page = pos - pos % _PAGE
                self._mm.madvise(mmap.MADV_DONTNEED, page, end - page)

    def close(self) -> None:
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # a caller still holds a view; the mapping dies with it
                pass
        self._file.close()

    def __enter__(self) -> MappedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# A payload is either bytes-like or a callable returning an iterable of bytes-like chunks.
Payload = bytes | memoryview | Callable[[], Iterable[bytes | memoryview]]


@dataclass(frozen=True)
class WriteEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    payload: Payload


def encode_header(entries: list[WriteEntry], metadata: dict[str, str] | None) -> bytes:
    """Length prefix + JSON header, padded with spaces to a multiple of 8 bytes (as the spec allows)."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    pos = 0
    for e in entries:
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [pos, pos + e.nbytes]}
        pos += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_safetensors(f: BinaryIO, entries: list[WriteEntry], metadata: dict[str, str] | None = None) -> None:
    """Stream `entries` into an open binary file in the given order."""
    f.write(encode_header(entries, metadata))
    for e in entries:
        chunks = [e.payload] if isinstance(e.payload, (bytes, memoryview)) else e.payload()
        written = 0
        for chunk in chunks:
            written += f.write(chunk)
        if written != e.nbytes:
            raise RegistryError(f"tensor {e.name}: wrote {written} bytes, header says {e.nbytes}")
