"""`autoglm models ...` registry commands, through main(argv) and one real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from open_autoglm.registry.cli import main

REPO = Path(__file__).parents[1]


def write_model(folder: Path, seed: int, num_layers: int = 20) -> Path:
    rng = np.random.default_rng(0)
    tensors = {
        f"layers.{i}.weight": rng.standard_normal((32, 32), dtype=np.float32) for i in range(num_layers)
    }
    tensors["layers.7.weight"] = tensors["layers.7.weight"] + seed  # the fine-tuned tensor
    folder.mkdir(parents=True)
    safetensors.numpy.save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (folder / "tokenizer_config.json").write_text('{"chat_template": "{{ messages }}"}')
    return folder


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["models", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """A registry with tiny v1 and v2 (one tensor changed)."""
    reg = str(tmp_path / "registry")
    for seed in (0, 1):
        code, _, _ = run(
            capsys, "publish", "tiny", str(write_model(tmp_path / f"m{seed}", seed)), "--registry", reg
        )
        assert code == 0
    return reg


def test_publish_list_show_verify(root: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write_model(tmp_path / "m3", 3)
    code, out, _ = run(capsys, "publish", "tiny", str(src), "--version", "exp", "--parent", "v2",
                       "--metrics", '{"mmlu": 0.61}', "--registry", root, "--json")  # fmt: skip
    summary = json.loads(out)
    assert code == 0 and (summary["version"], summary["parent"], summary["metrics"]) == (
        "exp",
        "v2",
        {"mmlu": 0.61},
    )
    code, out, _ = run(capsys, "list", "tiny", "--registry", root)
    assert code == 0 and out.splitlines()[0].split()[:3] == ["VERSION", "CREATED", "(UTC)"]
    assert [line.split()[0] for line in out.splitlines()[1:]] == ["v1", "v2", "exp"]
    code, out, _ = run(capsys, "list", "--registry", root, "--json")
    assert json.loads(out) == {"tiny": {"versions": ["v1", "v2", "exp"], "aliases": {}}}
    code, out, _ = run(capsys, "show", "tiny", "exp", "--tensors", "--registry", root)
    assert code == 0 and "manifest_hash:" in out and "layers.7.weight" in out and "config.json" in out
    code, out, _ = run(capsys, "show", "tiny", "v1", "--registry", root, "--json")
    assert json.loads(out)["tensors"]["layers.0.weight"]["shape"] == [32, 32]
    code, out, _ = run(capsys, "verify", "tiny", "v2", "--registry", root)
    assert code == 0 and out.startswith("ok: tiny v2: 20 tensors")


def test_verify_failure_exits_1(root: str, capsys: pytest.CaptureFixture[str]) -> None:
    config = Path(root) / "tiny" / "versions" / "v1" / "config.json"
    config.chmod(0o644)
    config.write_text("{}")
    code, out, _ = run(capsys, "verify", "tiny", "v1", "--registry", root, "--json")
    result = json.loads(out)
    assert code == 1 and not result["ok"] and result["mismatches"][0]["name"] == "config.json"


def test_alias_diff_delta_apply_gc(root: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "alias", "tiny", "v1", "stable", "--registry", root)
    assert code == 0 and out.strip() == "stable=v1"
    code, out, _ = run(capsys, "diff", "tiny", "stable", "v2", "--registry", root)
    assert code == 0 and out.startswith("stable -> v2: 1 changed (4.0 KiB, 5.00% of 80.0 KiB)")
    code, out, _ = run(capsys, "diff", "tiny", "v1", "v2", "--registry", root, "--json")
    assert [c["name"] for c in json.loads(out)["changed"]] == ["layers.7.weight"]
    delta = tmp_path / "d.safetensors"
    code, out, _ = run(capsys, "delta", "tiny", "v1", "v2", "-o", str(delta), "--registry", root)
    assert code == 0 and out.startswith(f"wrote {delta}: 1 tensor(s) + 0 file(s)")
    code, out, _ = run(
        capsys, "apply", "tiny", "stable", str(delta), "--version", "v2b", "--registry", root, "--json"
    )
    applied = json.loads(out)
    code2, out2, _ = run(capsys, "show", "tiny", "v2", "--registry", root, "--json")
    assert code == code2 == 0 and applied["manifest_hash"] == json.loads(out2)["manifest_hash"]
    code, out, _ = run(capsys, "gc", "tiny", "--keep", "1", "--dry-run", "--registry", root)
    assert code == 0 and out.strip() == "would remove: v2"
    code, out, _ = run(capsys, "gc", "tiny", "--keep", "1", "--registry", root, "--json")
    assert json.loads(out) == {"removed": ["v2"], "dry_run": False}
    code, out, _ = run(capsys, "alias", "tiny", "-", "stable", "--delete", "--registry", root)
    assert code == 0 and out.strip() == "no aliases"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["show", "tiny", "v9"], "no version or alias 'v9'"),
        (["show", "nope", "v1"], "no model 'nope'"),
        (["publish", "tiny", "/nonexistent"], "not a folder"),
        (["publish", "tiny", ".", "--metrics", "[1]"], "must be a JSON object"),
        (["alias", "tiny", "v1", "v2"], "is a version id"),
        (["apply", "tiny", "v1", "/nonexistent.safetensors"], "cannot open"),
    ],
)
def test_errors_exit_2_without_traceback(
    root: str, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code, out, err = run(capsys, *argv, "--registry", root)
    assert code == 2 and out == "" and err.startswith("error: ") and message in err and "Traceback" not in err


def test_subprocess(root: str) -> None:
    cmd = [sys.executable, "-m", "open_autoglm.registry.cli", "models"]
    ok = subprocess.run(
        [*cmd, "list", "tiny", "--registry", root, "--json"], cwd=REPO, capture_output=True, text=True
    )
    assert ok.returncode == 0 and [v["version"] for v in json.loads(ok.stdout)["versions"]] == ["v1", "v2"]
    bad = subprocess.run(
        [*cmd, "verify", "tiny", "v7", "--registry", root], cwd=REPO, capture_output=True, text=True
    )
    assert bad.returncode == 2 and "no version or alias 'v7'" in bad.stderr and "Traceback" not in bad.stderr
