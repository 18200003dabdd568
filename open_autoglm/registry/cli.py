"""`autoglm models ...` registry commands: publish, list, show, verify, alias, gc, diff, delta, apply.

The lead wires them in with `add_registry_commands(models_subparsers)`; `main(argv)` runs them
standalone: `python -m open_autoglm.registry.cli models list --registry DIR`.
Exit codes: 0 ok, 1 verify found mismatches, 2 error (message on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from open_autoglm.registry.diff import Diff
from open_autoglm.registry.errors import RegistryError
from open_autoglm.registry.manifest import Manifest
from open_autoglm.registry.store import DEFAULT_ROOT, Registry

Handler = Callable[[argparse.Namespace], int]


def _guarded(fn: Handler) -> Handler:
    @functools.wraps(fn)
    def handler(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except (RegistryError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    return handler


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    raise AssertionError("unreachable")


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [headers] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def _emit(args: argparse.Namespace, obj: Any, text: str) -> None:
    print(json.dumps(obj, indent=1) if args.json else text)


def _summary(m: Manifest, aliases: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "name": m.name,
        "version": m.version,
        "parent": m.parent,
        "created": m.created,
        "manifest_hash": m.manifest_hash,
        "num_tensors": len(m.tensors),
        "total_nbytes": m.total_nbytes,
        "metrics": m.metrics,
        "aliases": sorted(a for a, v in (aliases or {}).items() if v == m.version),
    }


def _parse_metrics(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        metrics = json.loads(text)
    except ValueError as e:
        raise RegistryError(f"--metrics: not valid JSON ({e})") from None
    if not isinstance(metrics, dict):
        raise RegistryError("--metrics: must be a JSON object, e.g. '{\"mmlu\": 0.61}'")
    return metrics


# -- handlers ----------------------------------------------------------------------------------


@_guarded
def cmd_publish(args: argparse.Namespace) -> int:
    reg = Registry(args.registry)
    m = reg.publish(args.name, args.path, args.version, args.parent, _parse_metrics(args.metrics))
    text = f"published {m.name} {m.version}: {len(m.tensors)} tensors, {_size(m.total_nbytes)}, manifest {m.manifest_hash}"
    _emit(args, {**_summary(m), "path": str(reg.resolve(m.name, m.version))}, text)
    return 0


@_guarded
def cmd_list(args: argparse.Namespace) -> int:
    reg = Registry(args.registry)
    if args.name is None:
        names = {n: ([m.version for m in reg.list_versions(n)], reg.aliases(n)) for n in reg.names()}
        rows = [[n, len(v), v[-1] if v else "-", " ".join(f"{a}={t}" for a, t in al.items()) or "-"]
                for n, (v, al) in names.items()]  # fmt: skip
        text = _table(["NAME", "VERSIONS", "NEWEST", "ALIASES"], rows) if rows else f"no models in {reg.root}"
        _emit(args, {n: {"versions": v, "aliases": al} for n, (v, al) in names.items()}, text)
        return 0
    aliases = reg.aliases(args.name)
    found = reg.list_versions(args.name)
    rows = [[m.version, m.created[:19].replace("T", " "), m.parent or "-", len(m.tensors), _size(m.total_nbytes),
             m.manifest_hash[:16], ",".join(_summary(m, aliases)["aliases"]) or "-"] for m in found]  # fmt: skip
    text = _table(["VERSION", "CREATED (UTC)", "PARENT", "TENSORS", "SIZE", "MANIFEST", "ALIASES"], rows)
    _emit(args, {"versions": [_summary(m, aliases) for m in found], "aliases": aliases}, text)
    return 0


@_guarded
def cmd_show(args: argparse.Namespace) -> int:
    reg = Registry(args.registry)
    m = reg.show(args.name, args.version)
    lines = [f"{k + ':':<20}{v}" for k, v in [
        ("name", m.name), ("version", m.version), ("path", reg.resolve(m.name, m.version)),
        ("created", m.created), ("parent", m.parent or "-"), ("manifest_hash", m.manifest_hash),
        ("chat_template_hash", m.chat_template_hash or "-"), ("metrics", json.dumps(m.metrics)),
        ("tensors", f"{len(m.tensors)} in {len(m.shards)} shard(s), {_size(m.total_nbytes)}"),
    ]]  # fmt: skip
    lines += [
        "",
        _table(["FILE", "SIZE", "HASH"], [[p, _size(f.nbytes), f.hash] for p, f in m.files.items()]),
    ]
    if args.tensors:
        rows = [
            [n, t.dtype, "x".join(map(str, t.shape)), _size(t.nbytes), t.hash, t.file]
            for n, t in m.tensors.items()
        ]
        lines += ["", _table(["TENSOR", "DTYPE", "SHAPE", "SIZE", "HASH", "FILE"], rows)]
    _emit(args, m.to_json(), "\n".join(lines))
    return 0


@_guarded
def cmd_verify(args: argparse.Namespace) -> int:
    r = Registry(args.registry).verify(args.name, args.version)
    head = f"{r.name} {r.version}: {r.num_tensors} tensors and {r.num_files} files re-hashed"
    text = f"ok: {head}" if r.ok else "\n".join([f"FAILED: {head}, {len(r.mismatches)} mismatch(es)"] +
                                                 [f"  {x}" for x in r.mismatches])  # fmt: skip
    obj = {"ok": r.ok, "name": r.name, "version": r.version, "num_tensors": r.num_tensors,
           "num_files": r.num_files, "mismatches": [vars(x) for x in r.mismatches]}  # fmt: skip
    _emit(args, obj, text)
    return 0 if r.ok else 1


@_guarded
def cmd_alias(args: argparse.Namespace) -> int:
    reg = Registry(args.registry)
    if args.delete:
        reg.remove_alias(args.name, args.alias)
    else:
        reg.set_alias(args.name, args.alias, args.version)
    aliases = reg.aliases(args.name)
    _emit(args, aliases, " ".join(f"{a}={v}" for a, v in aliases.items()) or "no aliases")
    return 0


@_guarded
def cmd_gc(args: argparse.Namespace) -> int:
    removed = Registry(args.registry).gc(args.name, keep=args.keep, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    _emit(args, {"removed": removed, "dry_run": args.dry_run}, f"{verb}: {' '.join(removed) or 'nothing'}")
    return 0


def _diff_text(d: Diff, v1: str, v2: str) -> str:
    share = 100 * d.changed_nbytes / d.total_nbytes if d.total_nbytes else 0.0
    lines = [
        f"{v1} -> {v2}: {len(d.changed)} changed ({_size(d.changed_nbytes)}, {share:.2f}% of {_size(d.total_nbytes)}), "
        f"{len(d.added)} added ({_size(d.added_nbytes)}), {len(d.removed)} removed ({_size(d.removed_nbytes)}), "
        f"{d.num_unchanged} unchanged"
    ]
    rows = [["changed", c.name, f"{c.before.dtype}{list(c.before.shape)}" if c.before else "-",
             f"{c.after.dtype}{list(c.after.shape)}" if c.after else "-", _size(c.after.nbytes if c.after else 0)]
            for c in d.changed]  # fmt: skip
    rows += [
        ["added", c.name, "-", f"{c.after.dtype}{list(c.after.shape)}", _size(c.after.nbytes)]
        for c in d.added
        if c.after
    ]
    rows += [
        ["removed", c.name, f"{c.before.dtype}{list(c.before.shape)}", "-", "0 B"]
        for c in d.removed
        if c.before
    ]
    if rows:
        lines += ["", _table(["", "TENSOR", "BEFORE", "AFTER", "SIZE"], rows)]
    for kind, paths in (("changed", d.files_changed), ("added", d.files_added), ("removed", d.files_removed)):
        lines += [f"file {kind}: {p}" for p in paths]
    return "\n".join(lines)


@_guarded
def cmd_diff(args: argparse.Namespace) -> int:
    d = Registry(args.registry).diff(args.name, args.v1, args.v2)
    _emit(args, d.to_json(), _diff_text(d, args.v1, args.v2))
    return 0


@_guarded
def cmd_delta(args: argparse.Namespace) -> int:
    d = Registry(args.registry).make_delta(args.name, args.v1, args.v2, args.output)
    nbytes = Path(args.output).stat().st_size
    share = 100 * nbytes / d.total_nbytes if d.total_nbytes else 0.0
    text = (f"wrote {args.output}: {len(d.changed)} tensor(s) + {len(d.files_changed) + len(d.files_added)} file(s), "
            f"{_size(nbytes)} ({share:.2f}% of {_size(d.total_nbytes)})")  # fmt: skip
    obj = {"file": str(args.output), "nbytes": nbytes, "tensors": [c.name for c in d.changed],
           "files": d.files_changed + d.files_added, "base_manifest_hash": d.base_manifest_hash,
           "target_manifest_hash": d.target_manifest_hash}  # fmt: skip
    _emit(args, obj, text)
    return 0


@_guarded
def cmd_apply(args: argparse.Namespace) -> int:
    reg = Registry(args.registry)
    m = reg.apply_delta(args.name, args.v1, args.file, args.version, _parse_metrics(args.metrics))
    text = (
        f"applied {args.file} to {args.name} {m.parent} -> {m.version}: manifest {m.manifest_hash} (verified)"
    )
    _emit(args, {**_summary(m), "path": str(reg.resolve(m.name, m.version))}, text)
    return 0


# -- parser ------------------------------------------------------------------------------------


def add_registry_commands(models_subparsers: argparse._SubParsersAction) -> None:
    """Add the registry commands to the `autoglm models` subparsers; each sets `func=handler`."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--registry", metavar="DIR", default=None, help=f"registry root folder (default: {DEFAULT_ROOT})"
    )
    common.add_argument("--json", action="store_true", help="print machine-readable JSON instead of tables")

    def add(cmd: str, help: str, handler: Handler) -> argparse.ArgumentParser:
        p = models_subparsers.add_parser(cmd, help=help, description=help, parents=[common])
        p.set_defaults(func=handler)
        return p

    name_help = "model name in the registry (letters, digits, . _ -)"
    version_help = "version id (v1, v2, ...) or alias (stable, canary, ...)"
    p = add("publish", "copy a model folder into a new immutable version", cmd_publish)
    p.add_argument("name", metavar="NAME", help=name_help)
    p.add_argument(
        "path", metavar="PATH", help="Hugging Face model folder (config.json, *.safetensors, tokenizer)"
    )
    p.add_argument("--version", metavar="V", help="version id to create (default: next vN)")
    p.add_argument("--parent", metavar="V", help="version this one derives from (id or alias)")
    p.add_argument(
        "--metrics", metavar="JSON", help="free-form metrics, a JSON object, e.g. '{\"mmlu\": 0.61}'"
    )

    p = add("list", "list the versions of a model (or all models when NAME is left out)", cmd_list)
    p.add_argument("name", metavar="NAME", nargs="?", help=name_help)

    p = add("show", "show a version's manifest: hashes, files, metrics", cmd_show)
    p.add_argument("name", metavar="NAME", help=name_help)
    p.add_argument("version", metavar="V", help=version_help)
    p.add_argument("--tensors", action="store_true", help="also list every tensor (dtype, shape, size, hash)")

    p = add("verify", "re-hash every tensor and file of a version (exit 1 on mismatch)", cmd_verify)
    p.add_argument("name", metavar="NAME", help=name_help)
    p.add_argument("version", metavar="V", help=version_help)

    p = add("alias", "point an alias (stable, canary, any word) at a version", cmd_alias)
    p.add_argument("name", metavar="NAME", help=name_help)
    p.add_argument("version", metavar="V", help=version_help + " the alias points at (ignored with --delete)")
    p.add_argument("alias", metavar="ALIAS", help="alias to set: a word starting with a letter")
    p.add_argument("--delete", action="store_true", help="remove ALIAS instead of setting it")

    p = add("gc", "remove versions that no alias points to and that are not among the newest", cmd_gc)
    p.add_argument("name", metavar="NAME", help=name_help)
    p.add_argument(
        "--keep",
        metavar="N",
        type=int,
        default=3,
        help="newest versions to keep besides aliased ones (default: 3)",
    )
    p.add_argument("--dry-run", action="store_true", help="only print what would be removed")

    p = add("diff", "changed / added / removed tensors between two versions, with byte counts", cmd_diff)
    p.add_argument("name", metavar="NAME", help=name_help)
    p.add_argument("v1", metavar="V1", help="base " + version_help)
    p.add_argument("v2", metavar="V2", help="target " + version_help)

    p = add("delta", "write a delta package V1 -> V2 holding only the changed tensors", cmd_delta)
    p.add_argument("name", metavar="NAME", help=name_help)
    p.add_argument("v1", metavar="V1", help="base " + version_help)
    p.add_argument("v2", metavar="V2", help="target " + version_help)
    p.add_argument("-o", "--output", metavar="FILE", required=True, help="delta file to write (.safetensors)")

    p = add(
        "apply",
        "build a new version from V1 + a delta package (all checks pass or nothing changes)",
        cmd_apply,
    )
    p.add_argument("name", metavar="NAME", help=name_help)
    p.add_argument("v1", metavar="V1", help="base " + version_help + " the delta was made from")
    p.add_argument("file", metavar="FILE", help="delta package written by `delta`")
    p.add_argument("--version", metavar="V2B", help="version id to create (default: next vN)")
    p.add_argument(
        "--metrics", metavar="JSON", help="metrics of the new version (default: the delta target's)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point: `python -m open_autoglm.registry.cli models <command> ...`."""
    parser = argparse.ArgumentParser(prog="autoglm", description="Open-AutoGLM model registry")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    models = commands.add_parser(
        "models", help="model versions: publish, list, verify, alias, diff, delta, ..."
    )
    add_registry_commands(models.add_subparsers(dest="models_command", metavar="COMMAND", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
