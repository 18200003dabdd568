"""The weights version a model folder holds (seeds the prefix cache; reported as system_fingerprint)."""

from __future__ import annotations

import json
from pathlib import Path

import xxhash


def folder_version(path: Path) -> str:
    """A registry version folder names itself in manifest.json; any other folder or file gets a
    fingerprint of its weight files' names, sizes and modification times."""
    manifest = path / "manifest.json" if path.is_dir() else None
    if manifest is not None and manifest.is_file():
        data = json.loads(manifest.read_text())
        if "version" in data:
            return str(data["version"])
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    h = xxhash.xxh3_64()
    for f in files:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return f"{path.name}-{h.hexdigest()[:12]}"
