"""`autoglm update ...`: drive a running server's admin API (/admin/...) over HTTP.

    autoglm update status                                  what is serving, history, resident versions
    autoglm update swap PATH | --model M [--version V]     full hot swap
    autoglm update delta FILE | --model M --version V      delta package, or registry diff to V
    autoglm update rollback                                back to the previous version
    autoglm update preload PATH | --model M [--version V]  keep a version in host memory (resident)

Every command takes --url (default http://127.0.0.1:8000) and --api-key (or the AUTOGLM_API_KEY
environment variable, so the key stays out of `ps`). Exit codes: 0 done, 1 the server refused or
the update failed (the old version is still serving), 2 usage or connection error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import httpx


def add_update_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("update", help="live weight updates of a running server (swap, delta, rollback)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="update_command", required=True, metavar="ACTION")
    status = sub.add_parser("status", help="version served, update history, resident versions")
    _common(status)
    for name, help, mode in (("swap", "full hot swap to a model folder or registry version", "full"),
                             ("delta", "apply a delta package, or the registry diff to a version", "delta")):
        q = sub.add_parser(name, help=help)
        _source_args(q, "model folder" if mode == "full" else "delta package (.safetensors)")
        _policy_args(q)
        q.add_argument("--staging", choices=("auto", "host", "device"), default="auto",
                       help="where the new weights wait: device (a second copy on the GPU) or host (default: "
                            "device when it fits)")
        q.set_defaults(mode=mode)
        _common(q)
    q = sub.add_parser("rollback", help="back to the version before the last update")
    _policy_args(q)
    _common(q)
    q = sub.add_parser("preload", help="load a version into host memory without switching (load_strategy resident)")
    _source_args(q, "model folder")
    _common(q)
    p.set_defaults(func=cmd_update)
    return p


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server address (default: http://127.0.0.1:8000)")
    p.add_argument("--api-key", default=None, help="the server's API key (default: $AUTOGLM_API_KEY)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the update (default: 900)")
    p.add_argument("--json", action="store_true", help="print the server's JSON answer")


def _source_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("path", nargs="?", default=None, help=f"{what} on the server's disk")
    p.add_argument("--model", default=None, help="registry model name (instead of a path)")
    p.add_argument("--version", default=None, help="registry version id or alias (default: the newest)")
    p.add_argument("--registry", default=None, help="registry root on the server (default: its own)")
    p.add_argument("--warmup-prompt", action="append", default=None, dest="warmup_prompts",
                   help="prompt the new weights must continue before serving (repeat; default: built-in ones)")
    p.add_argument("--no-warmup", action="store_const", const=[], dest="warmup_prompts", help="skip the warm-up")


def _policy_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", choices=("drain", "recompute", "abort"), default="drain",
                   help="requests already running: drain = finish on the old weights (new ones wait), "
                        "recompute = continue on the new weights, abort = end them (default: drain)")
    p.add_argument("--drain-timeout", type=float, default=None,
                   help="drain: seconds before the requests still running are recomputed instead")


def request_for(args: argparse.Namespace) -> tuple[str, str, dict | None]:
    """(method, route, JSON body) of one command."""
    action = args.update_command
    if action == "status":
        return "GET", "/admin/status", None
    if action == "rollback":
        return "POST", "/admin/rollback", _clean({"policy": args.policy, "drain_timeout": args.drain_timeout})
    if bool(args.path) == bool(args.model):
        raise ValueError(f"autoglm update {action}: give a PATH or --model (with --version), not both")
    path = args.path
    if path and Path(path).exists():  # the server resolves paths itself: send an absolute one
        path = str(Path(path).resolve())
    body = _clean({"path": path, "model": args.model, "version": args.version, "registry": args.registry,
                   "warmup_prompts": args.warmup_prompts})
    if action == "preload":
        return "POST", "/admin/preload", body
    body.update(_clean({"mode": args.mode, "policy": args.policy, "staging": args.staging,
                        "drain_timeout": args.drain_timeout}))
    return "POST", "/admin/update", body


def cmd_update(args: argparse.Namespace) -> int:
    method, route, body = request_for(args)
    key = args.api_key or os.environ.get("AUTOGLM_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        response = httpx.request(method, args.url.rstrip("/") + route, json=body, headers=headers,
                                 timeout=httpx.Timeout(args.timeout, connect=10.0))
    except httpx.HTTPError as e:
        print(f"error: cannot reach {args.url}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    try:
        answer = response.json()
    except ValueError:
        answer = {"error": {"message": response.text or f"HTTP {response.status_code}"}}
    if args.json:
        print(json.dumps(answer, indent=1))
    if response.status_code != 200:
        if not args.json:
            message = answer.get("error", {}).get("message", answer) if isinstance(answer, dict) else answer
            print(f"error: HTTP {response.status_code}: {message}", file=sys.stderr)
        return 1
    if not args.json:
        print(format_status(answer) if args.update_command == "status" else format_report(answer))
    return 0


def format_report(r: dict) -> str:
    if r.get("status") == "noop":
        return f"already serving {r['to_version']}: nothing to do"
    secs = r.get("seconds", {})
    stages = ", ".join(f"{k} {v:.3f}s" for k, v in secs.items() if k != "total")
    reqs = ", ".join(f"{k} {v}" for k, v in r.get("requests", {}).items())
    return (f"{r['mode']} {r['from_version']} -> {r['to_version']} ({r['policy']}, staged on {r.get('staging') or '-'}): "
            f"{r['num_tensors']} tensors, {r['bytes_moved'] / 2**20:.2f} MiB moved in {secs.get('total', 0):.3f}s\n"
            f"  stages: {stages}\n  requests: {reqs or '-'}")


def format_status(s: dict) -> str:
    lines = [f"serving {s.get('model', '')} version {s['version']} (manifest {s.get('manifest_hash') or '-'})",
             f"  from {s['model_path']}; load strategy {s['load_strategy']}"
             + ("" if s.get("weights_loaded", True) else " (weights not loaded yet)")]
    if s.get("in_progress"):
        cur = s["in_progress"]
        lines.append(f"  in progress: {cur['mode']} -> {cur['to_version'] or '?'} at {cur['stage']}")
    for h in reversed(s.get("history", [])):
        lines.append(f"  rollback -> {h['rollback_to']}: {h['num_tensors']} tensors, {h['bytes'] / 2**20:.2f} MiB on host")
    for v in s.get("resident", []):
        lines.append(f"  resident {v['version']}: {v['bytes'] / 2**20:.2f} MiB")
    return "\n".join(lines)


def _clean(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}
