"""Registry on real files: publish, list, show, verify, aliases and gc on tiny random Hugging Face folders."""

from __future__ import annotations

import ast
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import xxhash
from test_registry_helpers import (
    TEMPLATE,
    data_start,
    fine_tune,
    flip_byte,
    random_tensors,
    staged,
    write_model,
)

from open_autoglm.registry import Registry, RegistryError, compute_manifest


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
