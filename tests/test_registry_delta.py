"""Registry diffs and delta packages: sizes, what they carry, and rejected deltas that leave nothing behind."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
from test_registry_helpers import data_start, fine_tune, flip_byte, random_tensors, staged, write_model

from open_autoglm.registry import (
    DeltaError,
    Manifest,
    Registry,
    compute_manifest,
    diff_manifests,
    read_delta,
)

Tuned = tuple[Registry, dict[str, np.ndarray]]


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "registry")


# -- diff and deltas ---------------------------------------------------------------------------


def test_diff_counts(reg: Registry, tmp_path: Path) -> None:
    tensors = random_tensors(num_layers=10)
    reg.publish("tiny", write_model(tmp_path / "a", tensors))
    changed = ["model.layers.3.mlp.weight", "model.norm.weight"]
    grown = fine_tune(tensors, changed) | {"lm_head.weight": np.ones((8, 64), np.float32)}
    del grown["model.layers.9.mlp.weight"]
    reg.publish("tiny", write_model(tmp_path / "b", grown, template="new"))
    d = reg.diff("tiny", "v1", "v2")
    assert [c.name for c in d.changed] == changed
    assert [c.name for c in d.added] == ["lm_head.weight"] and [c.name for c in d.removed] == [
        "model.layers.9.mlp.weight"
    ]
    assert d.num_unchanged == 9  # 8 layers + the empty tensor
    assert d.changed_nbytes == 64 * 256 * 4 + 64 * 2
    assert (d.added_nbytes, d.removed_nbytes) == (8 * 64 * 4, 64 * 256 * 4)
    assert d.total_nbytes == sum(t.nbytes for t in grown.values())
    assert d.files_changed == ["tokenizer_config.json"]
    assert len(d.delta_refusals()) == 2
    assert reg.diff("tiny", "v1", "v1").identical


@pytest.fixture
def tuned(reg: Registry, tmp_path: Path) -> Tuned:
    """v1 = base (sharded), v2 = base with one layer fine-tuned (1% of the bytes)."""
    base = random_tensors()
    reg.publish("tiny", write_model(tmp_path / "v1", base, sharded=True))
    new = fine_tune(base, ["model.layers.42.mlp.weight"])
    reg.publish("tiny", write_model(tmp_path / "v2", new, sharded=True), parent="v1", metrics={"acc": 0.9})
    return reg, new


def test_delta_is_small_and_applies(tuned: Tuned, tmp_path: Path) -> None:
    reg, new = tuned
    delta = tmp_path / "v1-v2.delta.safetensors"
    d = reg.make_delta("tiny", "v1", "v2", delta)
    total = reg.show("tiny", "v2").total_nbytes
    assert [c.name for c in d.changed] == ["model.layers.42.mlp.weight"]
    assert 0.01 * total < delta.stat().st_size < 0.015 * total  # 1% of the bytes + the target manifest
    with read_delta(delta) as pkg:
        assert pkg.base_manifest_hash == reg.show("tiny", "v1").manifest_hash
        assert (
            pkg.target_manifest_hash
            == reg.show("tiny", "v2").manifest_hash
            == pkg.target_manifest.manifest_hash
        )
        assert pkg.nbytes == new["model.layers.42.mlp.weight"].nbytes
        pkg.verify()
        [(name, dtype, shape, data)] = list(pkg.tensors())
        assert (name, dtype, shape) == ("model.layers.42.mlp.weight", "F32", (64, 256))
        assert bytes(data) == new[name].tobytes()
        del data
    loaded = safetensors.numpy.load_file(str(delta))  # any safetensors reader opens it
    np.testing.assert_array_equal(loaded["model.layers.42.mlp.weight"], new["model.layers.42.mlp.weight"])

    m = reg.apply_delta("tiny", "v1", delta, "v2b")
    assert m.manifest_hash == reg.show("tiny", "v2").manifest_hash
    assert (m.version, m.parent, m.metrics) == ("v2b", "v1", {"acc": 0.9})
    assert reg.verify("tiny", "v2b").ok
    v1, v2b = reg.resolve("tiny", "v1"), reg.resolve("tiny", "v2b")
    untouched = next(s for s in m.shards if "model.layers.42.mlp.weight" not in _shard_names(m, s))
    assert (v1 / untouched).stat().st_ino == (v2b / untouched).stat().st_ino  # hard-linked, not copied
    assert reg.apply_delta("tiny", "v1", delta).version == "v3"


def _shard_names(m: Manifest, shard: str) -> set[str]:
    return {n for n, t in m.tensors.items() if t.file == shard}


def test_delta_carries_config_and_template_changes(reg: Registry, tmp_path: Path) -> None:
    base = random_tensors(num_layers=3)
    reg.publish("tiny", write_model(tmp_path / "v1", base))
    v2 = write_model(tmp_path / "v2", fine_tune(base, ["model.norm.weight"]), template="{{ new }}")
    (v2 / "generation_config.json").unlink()
    (v2 / "chat_template.jinja").write_text("{{ newer }}")
    reg.publish("tiny", v2)
    delta = tmp_path / "d.safetensors"
    reg.make_delta("tiny", "v1", "v2", delta)
    with read_delta(delta) as pkg:
        assert sorted(pkg.file_names) == ["chat_template.jinja", "tokenizer_config.json"]
        assert pkg.removed_files == ["generation_config.json"]
    m = reg.apply_delta("tiny", "v1", delta)
    assert m.manifest_hash == reg.show("tiny", "v2").manifest_hash and reg.verify("tiny", m.version).ok
    assert not (reg.resolve("tiny", m.version) / "generation_config.json").exists()


def test_make_delta_refuses_architecture_changes(reg: Registry, tmp_path: Path) -> None:
    base = random_tensors(num_layers=3)
    reg.publish("tiny", write_model(tmp_path / "v1", base))
    reshaped = dict(base, **{"model.layers.1.mlp.weight": np.zeros((256, 64), np.float32)})
    reg.publish("tiny", write_model(tmp_path / "v2", reshaped))
    out = tmp_path / "d.safetensors"
    with pytest.raises(
        DeltaError, match=r"model.layers.1.mlp.weight changed F32\[64, 256\] -> F32\[256, 64\]"
    ):
        reg.make_delta("tiny", "v1", "v2", out)
    assert not out.exists() and list(tmp_path.glob(".d.safetensors*")) == []


# -- rejected deltas leave nothing behind --------------------------------------------------------


def _rewrite(delta: Path, edit: Callable[[dict], None]) -> None:
    """Re-encode a delta's JSON header after `edit(header)`, keeping its data bytes."""
    raw = delta.read_bytes()
    start = data_start(delta)
    header = json.loads(raw[8:start])
    edit(header)
    text = json.dumps(header).encode()
    delta.write_bytes(struct.pack("<Q", len(text)) + text + raw[start:])


def _flip_data(delta: Path) -> None:
    flip_byte(delta, data_start(delta) + 100)


def _truncate(delta: Path) -> None:
    delta.write_bytes(delta.read_bytes()[:-10])


def _reshape(delta: Path) -> None:
    _rewrite(delta, lambda h: h["model.layers.42.mlp.weight"].update(shape=[256, 64]))


def _rename(delta: Path) -> None:
    _rewrite(delta, lambda h: h.update({"model.layers.999.weight": h.pop("model.layers.42.mlp.weight")}))


def _tamper_manifest(delta: Path) -> None:
    def edit(h: dict) -> None:
        target = json.loads(h["__metadata__"]["target_manifest"])
        target["tensors"]["model.layers.42.mlp.weight"]["hash"] = "0" * 32
        h["__metadata__"]["target_manifest"] = json.dumps(target)

    _rewrite(delta, edit)


def _consistent_reshape(delta: Path) -> None:
    """A self-consistent target manifest whose tensor has another shape than in the base."""

    def edit(h: dict) -> None:
        target = json.loads(h["__metadata__"]["target_manifest"])
        target["tensors"]["model.layers.42.mlp.weight"]["shape"] = [256, 64]
        m = Manifest.from_json(target)
        target["manifest_hash"] = h["__metadata__"]["target_manifest_hash"] = m.content_hash()
        h["__metadata__"]["target_manifest"] = json.dumps(target)
        h["model.layers.42.mlp.weight"]["shape"] = [256, 64]

    _rewrite(delta, edit)


@pytest.mark.parametrize(
    ("corrupt", "error"),
    [
        (_flip_data, "corrupt: hash mismatch for model.layers.42.mlp.weight"),
        (_truncate, "truncated"),
        (_reshape, "shape/dtype changes are not deltas"),
        (_rename, "unknown tensor model.layers.999.weight"),
        (_tamper_manifest, "does not hash to target_manifest_hash"),
        (_consistent_reshape, "changes shape/dtype F32\\[64, 256\\] -> F32\\[256, 64\\]"),
        (None, "wrong base"),
    ],
)
def test_apply_rejects_and_changes_nothing(
    tuned: Tuned, tmp_path: Path, corrupt: Callable[[Path], None] | None, error: str
) -> None:
    reg, _ = tuned
    delta = tmp_path / "d.safetensors"
    reg.make_delta("tiny", "v1", "v2", delta)
    base = "v1"
    if corrupt is None:  # a delta made from v1 offered to v2
        base = "v2"
    else:
        corrupt(delta)
    before = sorted(p.name for p in (reg.root / "tiny" / "versions").iterdir())
    with pytest.raises(DeltaError, match=error):
        reg.apply_delta("tiny", base, delta, "v3")
    assert sorted(p.name for p in (reg.root / "tiny" / "versions").iterdir()) == before == ["v1", "v2"]
    assert staged(reg, "tiny") == []


def test_reader_yields_nothing_from_a_corrupt_package(tuned: Tuned, tmp_path: Path) -> None:
    reg, new = tuned
    delta = tmp_path / "d.safetensors"
    reg.make_delta("tiny", "v1", "v2", delta)
    _flip_data(delta)
    yielded = []
    with read_delta(delta) as pkg, pytest.raises(DeltaError, match="corrupt"):
        pkg.check_base(reg.show("tiny", "v1").manifest_hash)
        yielded.extend(t.name for t in pkg.tensors())
    assert yielded == []
    with read_delta(delta) as pkg, pytest.raises(DeltaError, match="wrong base"):
        pkg.check_base(reg.show("tiny", "v2").manifest_hash)


def test_diff_manifests_outside_registry(tmp_path: Path) -> None:
    base = random_tensors(num_layers=2)
    m1 = compute_manifest(write_model(tmp_path / "a", base))
    m2 = compute_manifest(
        write_model(tmp_path / "b", fine_tune(base, ["model.layers.1.mlp.weight"]), sharded=True)
    )
    d = diff_manifests(m1, m2)
    assert [c.name for c in d.changed] == ["model.layers.1.mlp.weight"] and d.delta_refusals() == []
    assert d.files_changed == [] and d.files_added == []  # the shard index is layout, not content
