"""Model registry: which versions of a model exist. Plain Python, no torch, no HTTP.

Immutable version folders with a manifest (per-tensor content hashes), aliases (stable, canary),
diffs and delta packages (only the changed tensors). See docs/registry.md.

    from open_autoglm.registry import Registry, read_delta
    reg = Registry("/data/registry")            # default ~/.cache/open-autoglm/registry
    reg.publish("qwen2.5-1.5b", "/models/ft-run-7", metrics={"mmlu": 0.61})
    reg.make_delta("qwen2.5-1.5b", "v1", "v2", "v1-v2.delta.safetensors")
    with read_delta("v1-v2.delta.safetensors") as pkg:
        pkg.check_base(running_manifest_hash)
        for name, dtype, shape, data in pkg.tensors():  # the whole package is verified first
            ...                                 # copy into the live weights (data: memoryview)
"""

from open_autoglm.registry.delta import DeltaPackage, DeltaTensor, read_delta
from open_autoglm.registry.diff import Diff, TensorChange, diff_manifests
from open_autoglm.registry.errors import DeltaError, RegistryError
from open_autoglm.registry.manifest import (
    FileEntry,
    Manifest,
    Mismatch,
    ShardEntry,
    TensorEntry,
    VerifyResult,
    compute_manifest,
    verify_folder,
)
from open_autoglm.registry.safetensors_io import hash_bytes
from open_autoglm.registry.store import (
    DEFAULT_ROOT,
    Registry,
    apply_delta,
    diff,
    gc,
    list_versions,
    make_delta,
    publish,
    resolve,
    set_alias,
    show,
    verify,
)

__all__ = [
    "DEFAULT_ROOT",
    "DeltaError",
    "DeltaPackage",
    "DeltaTensor",
    "Diff",
    "FileEntry",
    "Manifest",
    "Mismatch",
    "Registry",
    "RegistryError",
    "ShardEntry",
    "TensorChange",
    "TensorEntry",
    "VerifyResult",
    "apply_delta",
    "compute_manifest",
    "diff",
    "diff_manifests",
    "gc",
    "hash_bytes",
    "list_versions",
    "make_delta",
    "publish",
    "read_delta",
    "resolve",
    "set_alias",
    "show",
    "verify",
    "verify_folder",
]
