"""Registry on real files: tiny random Hugging Face folders with real safetensors shards."""

from __future__ import annotations

import ast
import json
import os
import shutil
import stat
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import xxhash

from open_autoglm.registry import (
    DeltaError,
    Manifest,
    Registry,
    RegistryError,
    compute_manifest,
    diff_manifests,
    read_delta,
)

TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
NUM_LAYERS = 100  # 100 equal tensors: changing one is 1% of the bytes
Tuned = tuple[Registry, dict[str, np.ndarray]]


def random_tensors(seed: int = 0, num_layers: int = NUM_LAYERS) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tensors = {
        f"model.layers.{i}.mlp.weight": rng.standard_normal((64, 256), dtype=np.float32)
        for i in range(num_layers)
    }
    tensors["model.norm.weight"] = rng.standard_normal(64).astype(np.float16)  # small, another dtype
    tensors["model.empty"] = np.zeros((0,), np.float32)  # zero bytes
    return tensors


def write_model(
    folder: Path, tensors: dict[str, np.ndarray], sharded: bool = False, template: str = TEMPLATE
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 64})
    )
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": template, "eos_token": "</s>"})
    )
    (folder / "generation_config.json").write_text(json.dumps({"temperature": 0.7}))
    if not sharded:
        safetensors.numpy.save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for fn, part in shards.items():
        safetensors.numpy.save_file(
            {n: tensors[n] for n in part}, str(folder / fn), metadata={"format": "pt"}
        )
    weight_map = {n: fn for fn, part in shards.items() for n in part}
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def fine_tune(tensors: dict[str, np.ndarray], names: list[str], seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        n: (t + rng.standard_normal(t.shape).astype(t.dtype) if n in names else t) for n, t in tensors.items()
    }


def flip_byte(path: Path, offset: int) -> None:
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def data_start(path: Path) -> int:
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def staged(reg: Registry, name: str) -> list[Path]:
    staging = reg.root / name / ".staging"
    return list(staging.iterdir()) if staging.is_dir() else []


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "registry")


# -- publish / list / show ---------------------------------------------------------------------


def test_publish_list_show(reg: Registry, tmp_path: Path) -> None:
    tensors = random_tensors()
    src = write_model(tmp_path / "src", tensors)
    m1 = reg.publish("tiny", src, metrics={"loss": 1.5})
    m2 = reg.publish("tiny", src, parent="v1")
    assert (m1.version, m2.version, m2.parent) == ("v1", "v2", "v1")
    assert m1.manifest_hash == m2.manifest_hash  # same content, same hash
    assert [m.version for m in reg.list_versions("tiny")] == ["v1", "v2"]
    assert reg.names() == ["tiny"]
    shown = reg.show("tiny", "v1")
    assert shown == m1 and shown.metrics == {"loss": 1.5} and shown.created.endswith("Z")
    for name, array in tensors.items():
        entry = shown.tensors[name]
        assert entry.hash == xxhash.xxh3_128_hexdigest(array.tobytes())
        assert (entry.shape, entry.nbytes, entry.file) == (array.shape, array.nbytes, "model.safetensors")
    assert shown.tensors["model.norm.weight"].dtype == "F16"
    config = (src / "config.json").read_bytes()
    assert shown.files["config.json"].hash == xxhash.xxh3_128_hexdigest(config)
    assert set(shown.files) == {
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    }
    assert shown.chat_template_hash == xxhash.xxh3_128_hexdigest(TEMPLATE.encode())
    on_disk = json.loads((reg.resolve("tiny", "v1") / "manifest.json").read_text())
    assert on_disk["manifest_hash"] == m1.manifest_hash and on_disk["tensors"]["model.empty"]["shape"] == [0]
    folder = reg.resolve("tiny", "v1")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o555
    assert stat.S_IMODE((folder / "model.safetensors").stat().st_mode) == 0o444
    assert staged(reg, "tiny") == []


def test_publish_refusals(reg: Registry, tmp_path: Path) -> None:
    src = write_model(tmp_path / "src", random_tensors(num_layers=2))
    reg.publish("tiny", src, version="2025-01-31")
    with pytest.raises(RegistryError, match="already exists"):
        reg.publish("tiny", src, version="2025-01-31")
    with pytest.raises(RegistryError, match="no version or alias 'v9'"):
        reg.publish("tiny", src, parent="v9")
    with pytest.raises(RegistryError, match="not a folder"):
        reg.publish("tiny", tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(RegistryError, match="no tensors"):
        reg.publish("tiny", empty)
    with pytest.raises(RegistryError, match="replace '/'"):
        reg.publish("org/tiny", src)
    with pytest.raises(RegistryError, match="JSON-serializable"):
        reg.publish("tiny", src, metrics={"bad": object()})
    assert [m.version for m in reg.list_versions("tiny")] == ["2025-01-31"]
    assert staged(reg, "tiny") == []
    assert reg.publish("tiny", src).version == "v1"  # auto ids count vN only


def test_manifest_hash_is_content_only(tmp_path: Path) -> None:
    tensors = random_tensors(num_layers=4)
    single = compute_manifest(write_model(tmp_path / "single", tensors))
    sharded = compute_manifest(write_model(tmp_path / "sharded", tensors, sharded=True))
    assert len(sharded.shards) == 2 and sharded.manifest_hash == single.manifest_hash
    assert "model.safetensors.index.json" in sharded.files
    other_template = compute_manifest(write_model(tmp_path / "t", tensors, template="{{ messages }}"))
    assert other_template.manifest_hash != single.manifest_hash
    tuned = compute_manifest(write_model(tmp_path / "ft", fine_tune(tensors, ["model.layers.0.mlp.weight"])))
    assert tuned.manifest_hash != single.manifest_hash
    assert single.content_hash() == single.manifest_hash


def test_bad_index_is_refused(tmp_path: Path) -> None:
    src = write_model(tmp_path / "src", random_tensors(num_layers=4), sharded=True)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    wm = index["weight_map"]
    wm["model.layers.0.mlp.weight"] = next(
        f for f in set(wm.values()) if f != wm["model.layers.0.mlp.weight"]
    )
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(RegistryError, match="weight_map disagrees"):
        compute_manifest(src)


# -- verify ------------------------------------------------------------------------------------


def test_verify_sharded_ok_then_catches_flipped_byte(reg: Registry, tmp_path: Path) -> None:
    reg.publish("tiny", write_model(tmp_path / "src", random_tensors(num_layers=6), sharded=True))
    result = reg.verify("tiny", "v1")
    assert result.ok and result.num_tensors == 8 and result.num_files == 7
    folder = reg.resolve("tiny", "v1")
    shard = folder / "model-00001-of-00002.safetensors"
    manifest = reg.show("tiny", "v1")
    name = next(n for n, t in sorted(manifest.tensors.items()) if t.file == shard.name and t.nbytes)
    header = json.loads(shard.read_bytes()[8 : data_start(shard)])  # locate the tensor's bytes
    flip_byte(shard, data_start(shard) + header[name]["data_offsets"][0] + 5)
    result = reg.verify("tiny", "v1")
    assert not result.ok
    assert [(m.kind, m.name) for m in result.mismatches] == [("tensor", name)]


def test_verify_catches_file_changes(reg: Registry, tmp_path: Path) -> None:
    reg.publish("tiny", write_model(tmp_path / "src", random_tensors(num_layers=2)))
    folder = reg.resolve("tiny", "v1")
    flip_byte(folder / "config.json", 3)
    os.chmod(folder, 0o755)
    (folder / "extra.txt").write_text("x")
    found = {(m.kind, m.name) for m in reg.verify("tiny", "v1").mismatches}
    assert found == {("file", "config.json"), ("file", "extra.txt")}
    flip_byte(folder / "model.safetensors", 20)  # inside the JSON header
    found = {(m.kind, m.name) for m in reg.verify("tiny", "v1").mismatches}
    assert ("shard", "model.safetensors") in found


# -- aliases and gc ----------------------------------------------------------------------------


def test_alias_and_resolve(reg: Registry, tmp_path: Path) -> None:
    src = write_model(tmp_path / "src", random_tensors(num_layers=2))
    for _ in range(2):
        reg.publish("tiny", src)
    reg.set_alias("tiny", "stable", "v1")
    reg.set_alias("tiny", "canary", "v2")
    assert reg.resolve("tiny", "stable") == reg.root / "tiny" / "versions" / "v1"
    assert reg.show("tiny", "canary").version == "v2"
    reg.set_alias("tiny", "stable", "canary")  # promote: an alias may name another alias
    assert reg.aliases("tiny") == {"canary": "v2", "stable": "v2"}
    with pytest.raises(RegistryError, match="no version or alias 'v7'"):
        reg.set_alias("tiny", "stable", "v7")
    with pytest.raises(RegistryError, match="is a version id"):
        reg.set_alias("tiny", "v1", "v2")
    with pytest.raises(RegistryError, match="is an alias"):
        reg.publish("tiny", src, version="stable")
    with pytest.raises(RegistryError, match="no version or alias 'nightly'"):
        reg.resolve("tiny", "nightly")
    with pytest.raises(RegistryError, match="no model 'other'"):
        reg.resolve("other", "v1")
    reg.remove_alias("tiny", "canary")
    assert reg.aliases("tiny") == {"stable": "v2"}


def test_gc_keeps_aliased_and_newest(reg: Registry, tmp_path: Path) -> None:
    src = write_model(tmp_path / "src", random_tensors(num_layers=2))
    for _ in range(5):
        reg.publish("tiny", src)
    reg.set_alias("tiny", "stable", "v1")
    reg.set_alias("tiny", "canary", "v3")
    assert reg.gc("tiny", keep=1, dry_run=True) == ["v2", "v4"]
    assert len(reg.list_versions("tiny")) == 5
    assert reg.gc("tiny", keep=1) == ["v2", "v4"]
    assert [m.version for m in reg.list_versions("tiny")] == ["v1", "v3", "v5"]
    assert reg.gc("tiny", keep=0) == ["v5"]
    assert reg.verify("tiny", "stable").ok and staged(reg, "tiny") == []
    assert reg.publish("tiny", src).version == "v4"  # ids continue from the highest left


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


def test_registry_imports_no_torch() -> None:
    for path in Path(__file__).parents[1].joinpath("open_autoglm", "registry").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] == "torch" for n in names), f"{path.name} imports torch"


def test_default_root_is_user_cache() -> None:
    assert Registry().root == Path.home() / ".cache" / "open-autoglm" / "registry"
    assert Registry("~/x").root == Path.home() / "x"


def test_copy_of_registry_keeps_working(reg: Registry, tmp_path: Path) -> None:
    """Version folders are self-contained: a copied root (backup, rsync) verifies as is."""
    reg.publish("tiny", write_model(tmp_path / "src", random_tensors(num_layers=2)))
    shutil.copytree(reg.root, tmp_path / "copy")
    assert Registry(tmp_path / "copy").verify("tiny", "v1").ok
