"""make_variant, the update benchmark's analysis, and one short end-to-end run on the tiny model."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from open_autoglm.bench.update import make_variant, prepare_versions
from open_autoglm.bench.update_report import check_targets, format_table, latency_windows
from open_autoglm.registry import Registry, RegistryError, compute_manifest, diff_manifests


@pytest.mark.parametrize("fraction", [0.05, 0.3])
def test_make_variant_changes_about_fraction_of_the_bytes(tiny_checkpoint, tmp_path, fraction):
    src = tiny_checkpoint("llama")
    changed = make_variant(src, tmp_path / "v", fraction, seed=3)
    diff = diff_manifests(compute_manifest(src), compute_manifest(tmp_path / "v"))
    assert sorted(c.name for c in diff.changed) == changed and changed
    assert not diff.added and not diff.removed and not diff.files_changed
    smallest = min(t.nbytes for t in compute_manifest(src).tensors.values())
    assert diff.changed_nbytes <= max(fraction * diff.total_nbytes, smallest)
    assert make_variant(src, tmp_path / "again", fraction, seed=3) == changed  # seeded


def test_prepare_versions_reuses_a_registry_of_the_same_weights(tiny_checkpoint, tmp_path):
    root = tmp_path / "registry"
    events = prepare_versions(tiny_checkpoint("llama"), root, "bench-tiny")
    before = [m.manifest_hash for m in Registry(root).list_versions("bench-tiny")]
    assert prepare_versions(tiny_checkpoint("llama"), root, "bench-tiny") == events  # a second run
    assert [m.manifest_hash for m in Registry(root).list_versions("bench-tiny")] == before
    with pytest.raises(RegistryError, match="other weights"):
        prepare_versions(tiny_checkpoint("qwen2"), root, "bench-tiny")


def _result(start, ttft, chunks, ok=True):
    return SimpleNamespace(ok=ok, start=start, ttft=ttft, chunk_times=chunks, e2e=chunks[-1] - start if chunks else 0)


def test_windows_and_targets():
    steady = [_result(0.0, 0.1, [0.1 + 0.05 * i for i in range(40)])]  # 50 ms ITL from 0.1 s to 2.05 s
    stall = [_result(1.0, 0.1, [1.1, 1.15, 1.6, 1.65])]                 # one 450 ms gap across 1.2..1.3
    results = steady + stall
    during = latency_windows(results, 1.2, 1.3, overlap=True)
    assert during["itl"]["p99"] > 400 and during["itl"]["p50"] < 60  # the 450 ms gap overlaps the update
    before = latency_windows(results, 0.0, 1.0, overlap=False)
    assert before["ttft"]["n"] == 1 and abs(before["itl"]["p50"] - 50) < 1e-6
    row = {"update": "full swap", "to": "v2", "seconds": 2.0, "work_seconds": 1.0, "switch_ms": 5.0,
           "bytes_moved": 100, "model_bytes": 100, "failed_requests": 0, "before": before, "during": during,
           "after": before}
    small = {**row, "update": "delta 1%", "work_seconds": 0.05, "bytes_moved": 1, "during": before}
    targets = {name: ok for name, ok, _ in check_targets([row, small], 0)}
    assert targets == {"0 failed requests": True, "full swap: p99 ITL during <= 2x steady": False,
                       "delta 1%: p99 ITL during <= 2x steady": True, "1% delta moves <= 2% of the model": True,
                       "1% delta takes <= 10% of the full swap": True}
    assert "| delta 1% | v2 |" in format_table([row, small], 100)


@pytest.mark.slow
def test_bench_update_end_to_end(tiny_checkpoint, tmp_path, monkeypatch):
    from open_autoglm.cli import main

    monkeypatch.chdir(tmp_path)
    rc = main(["bench", "update", "--model", str(tiny_checkpoint("llama")), "--clients", "4", "--input-len", "8",
               "--output-len", "8", "--warmup", "1", "--gap", "1.5", "--device", "cpu", "--min-token-id", "10",
               "--json", "out.json", "--plot", "out.png", "--server-arg=--num-kv-blocks=256"])
    report = json.loads((tmp_path / "out.json").read_text())
    assert rc == 0 and report["failed"] == 0 and report["requests"] > 0
    assert [r["update"] for r in report["rows"]] == ["full swap", "delta 1%", "delta 10%", "rollback"]
    assert [r["to"] for r in report["rows"]] == ["v2", "v3", "v4", "v3"]
    full, small = report["rows"][0], report["rows"][1]
    assert full["bytes_moved"] == full["model_bytes"] and 0 < small["bytes_moved"] < 0.05 * full["bytes_moved"]
    assert (tmp_path / "out.png").stat().st_size > 10_000
    assert {e["status"] for e in report["events"]} == {200}
