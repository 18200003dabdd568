"""Differences between two manifests: which tensors and model files changed, and how many bytes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from open_autoglm.registry.manifest import Manifest, TensorEntry, is_model_file


@dataclass(frozen=True)
class TensorChange:
    """A tensor that differs; `before` is None when added, `after` is None when removed."""

    name: str
    before: TensorEntry | None
    after: TensorEntry | None

    @property
    def layout_changed(self) -> bool:
        """Shape or dtype differs (not just the values)."""
        b, a = self.before, self.after
        return b is not None and a is not None and (b.shape, b.dtype) != (a.shape, a.dtype)

    def to_json(self) -> dict[str, Any]:
        def side(t: TensorEntry | None) -> dict[str, Any] | None:
            return (
                None
                if t is None
                else {"dtype": t.dtype, "shape": list(t.shape), "nbytes": t.nbytes, "hash": t.hash}
            )

        return {"name": self.name, "before": side(self.before), "after": side(self.after)}


@dataclass(frozen=True)
class Diff:
    """m1 -> m2. Byte counts: changed/added use m2's sizes, removed uses m1's, total is all of m2."""

    base_manifest_hash: str
    target_manifest_hash: str
    changed: list[TensorChange]
    added: list[TensorChange]
    removed: list[TensorChange]
    num_unchanged: int
    unchanged_nbytes: int
    files_changed: list[str]  # model files (config, tokenizer, ...) present in both, different
    files_added: list[str]
    files_removed: list[str]

    @property
    def changed_nbytes(self) -> int:
        return sum(c.after.nbytes for c in self.changed if c.after)

    @property
    def added_nbytes(self) -> int:
        return sum(c.after.nbytes for c in self.added if c.after)

    @property
    def removed_nbytes(self) -> int:
        return sum(c.before.nbytes for c in self.removed if c.before)

    @property
    def total_nbytes(self) -> int:
        """All tensor bytes of the target (m2)."""
        return self.changed_nbytes + self.added_nbytes + self.unchanged_nbytes

    @property
    def identical(self) -> bool:
        return self.base_manifest_hash == self.target_manifest_hash

    def delta_refusals(self) -> list[str]:
        """Why a delta cannot take m1 to m2 (empty when it can): deltas only replace tensor values."""
        reasons = [f"added tensor {c.name}" for c in self.added]
        reasons += [f"removed tensor {c.name}" for c in self.removed]
        for c in self.changed:
            if c.layout_changed and c.before and c.after:
                before, after = (
                    f"{c.before.dtype}{list(c.before.shape)}",
                    f"{c.after.dtype}{list(c.after.shape)}",
                )
                reasons.append(f"tensor {c.name} changed {before} -> {after}")
        return reasons

    def to_json(self) -> dict[str, Any]:
        return {
            "base_manifest_hash": self.base_manifest_hash,
            "target_manifest_hash": self.target_manifest_hash,
            "changed": [c.to_json() for c in self.changed],
            "added": [c.to_json() for c in self.added],
            "removed": [c.to_json() for c in self.removed],
            "num_unchanged": self.num_unchanged,
            "unchanged_nbytes": self.unchanged_nbytes,
            "files_changed": self.files_changed,
            "files_added": self.files_added,
            "files_removed": self.files_removed,
            "changed_nbytes": self.changed_nbytes,
            "added_nbytes": self.added_nbytes,
            "removed_nbytes": self.removed_nbytes,
            "total_nbytes": self.total_nbytes,
        }


def diff_manifests(m1: Manifest, m2: Manifest) -> Diff:
    """Compare tensors by name (hash, dtype, shape) and model files by path (hash); layout is ignored."""
    t1, t2 = m1.tensors, m2.tensors
    changed, unchanged_nbytes, num_unchanged = [], 0, 0
    for name in sorted(t1.keys() & t2.keys()):
        a, b = t1[name], t2[name]
        if (a.hash, a.shape, a.dtype) != (b.hash, b.shape, b.dtype):
            changed.append(TensorChange(name, a, b))
        else:
            num_unchanged += 1
            unchanged_nbytes += b.nbytes
    f1 = {p: f.hash for p, f in m1.files.items() if is_model_file(p)}
    f2 = {p: f.hash for p, f in m2.files.items() if is_model_file(p)}
    return Diff(
        base_manifest_hash=m1.manifest_hash,
        target_manifest_hash=m2.manifest_hash,
        changed=changed,
        added=[TensorChange(n, None, t2[n]) for n in sorted(t2.keys() - t1.keys())],
        removed=[TensorChange(n, t1[n], None) for n in sorted(t1.keys() - t2.keys())],
        num_unchanged=num_unchanged,
        unchanged_nbytes=unchanged_nbytes,
        files_changed=sorted(p for p in f1.keys() & f2.keys() if f1[p] != f2[p]),
        files_added=sorted(f2.keys() - f1.keys()),
        files_removed=sorted(f1.keys() - f2.keys()),
    )
