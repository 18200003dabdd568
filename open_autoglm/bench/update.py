"""`autoglm bench update`: live weight updates under steady streaming load, in one run.

    versions  v1 = the model; v2 = every tensor perturbed (full swap); v3 = v2 with ~1% of the bytes
              changed; v4 = v3 with ~10% changed (make_variant), published to a registry
    load      C clients, each streaming one completion after another (random token ids, fixed length)
    events    full swap v1 -> v2, delta v2 -> v3 (1%), delta v3 -> v4 (10%), rollback v4 -> v3,
              `--gap` seconds apart
    windows   before = the `--window` seconds before an update, during = tokens whose wait overlaps
              the update (start of the admin call -> its answer), after = the `--window` seconds after

Per event: update duration (total; work = total - drain wait; switch = engine pause), bytes moved,
failed requests (must be 0), TTFT and ITL p50/p99 before/during/after. Also a PNG of latency over time
with the updates marked and, with --cold-start, time to ready / first token of each load_strategy.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

# This module runs the benchmark (versions, server, load, events, the command); the read-out
# (latency windows, table, targets, plot) is bench/update_report.py.


# -- versions ----------------------------------------------------------------------------------------
def make_variant(src_folder: str | Path, dst_folder: str | Path, fraction: float, seed: int = 0,
                 scale: float = 0.02) -> list[str]:
    """Write a fine-tune-like copy of a model folder: about `fraction` of the weight bytes (whole
    tensors, picked at random) get Gaussian noise of `scale` x their own std; everything else is
    copied byte for byte. Returns the names of the changed tensors (at least one)."""
    import torch
    from safetensors.torch import load_file, save_file

    from open_autoglm.registry.manifest import MANIFEST_FILE, folder_files, weight_files

    src, dst = Path(src_folder), Path(dst_folder)
    dst.mkdir(parents=True, exist_ok=True)
    paths = folder_files(src)
    shards = weight_files(src, paths)
    for rel in paths:
        if rel not in shards and rel != MANIFEST_FILE:
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / rel, dst / rel)
    tensors = {rel: load_file(str(src / rel)) for rel in shards}
    sizes = {(rel, n): t.numel() * t.element_size() for rel, ts in tensors.items() for n, t in ts.items()}
    budget = fraction * sum(sizes.values())
    rng = random.Random(seed)
    order = sorted(sizes)
    rng.shuffle(order)
    chosen, used = [], 0
    for key in order:
        if used + sizes[key] <= budget:
            chosen.append(key)
            used += sizes[key]
    chosen = chosen or [min(order, key=sizes.__getitem__)]
    gen = torch.Generator().manual_seed(seed)
    for rel, name in chosen:
        t = tensors[rel][name]
        noise = torch.randn(t.shape, generator=gen, dtype=torch.float32)
        std = float(t.float().std()) if t.numel() > 1 else 1.0
        tensors[rel][name] = (t.float() + noise * scale * (std or 1.0)).to(t.dtype)
    for rel, ts in tensors.items():
        save_file({n: t.contiguous() for n, t in ts.items()}, str(dst / rel), metadata={"format": "pt"})
    return sorted(name for _, name in chosen)


def prepare_versions(base: Path, registry_root: Path, name: str, seed: int = 0) -> dict[str, str]:
    """Publish v1..v4 (see the module docstring); returns event label -> target version. A registry
    that already holds all four, made from the same weights (an earlier run), is reused."""
    from open_autoglm.registry import Registry, RegistryError
    from open_autoglm.registry.manifest import compute_manifest

    reg = Registry(registry_root)
    events = {"full swap": "v2", "delta 1%": "v3", "delta 10%": "v4", "rollback": "v3"}
    if name in reg.names():
        have = {m.version: m for m in reg.list_versions(name)}
        if {"v1", "v2", "v3", "v4"} <= have.keys() and have["v1"].tensors == compute_manifest(base).tensors:
            print(f"reusing the versions of {name} in {registry_root}", file=sys.stderr)
            return events
        raise RegistryError(f"{registry_root} already holds {name!r} (versions {', '.join(sorted(have))}) made from "
                            f"other weights or by an unfinished run: pass an empty --registry folder")
    work = registry_root / ".variants"
    reg.publish(name, base, version="v1")
    steps = (("v2", "v1", 1.0), ("v3", "v2", 0.01), ("v4", "v3", 0.10))
    for i, (version, parent, fraction) in enumerate(steps):
        make_variant(reg.resolve(name, parent), work / version, fraction, seed=seed + i)
        reg.publish(name, work / version, version=version, parent=parent, metrics={"variant_fraction": fraction})
        shutil.rmtree(work / version)
    return events


# -- a server of our own ---------------------------------------------------------------------------------
class Server:
    def __init__(self, model: Path, port: int, api_key: str, extra: list[str]) -> None:
        import subprocess
        import sys
        import tempfile

        self.url = f"http://127.0.0.1:{port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="autoglm-bench-update-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "open_autoglm.server", "--model", str(model), "--port", str(port),
               "--host", "127.0.0.1", "--api-key", api_key, "--no-access-log", *extra]
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 900.0) -> float:
        """Seconds from spawn to /health 200."""
        import httpx

        while time.perf_counter() - self.started < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; log: {self.log.name}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return time.perf_counter() - self.started
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not ready in {timeout}s; log: {self.log.name}")

    def stop(self) -> None:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except Exception:
                self.proc.kill()
                self.proc.wait()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- load and events -----------------------------------------------------------------------------------------
@dataclass
class Event:
    label: str
    route: str
    body: dict
    start: float = 0.0   # seconds since the run began
    end: float = 0.0
    status: int = 0
    report: dict = field(default_factory=dict)


async def run_load(args, url: str, events: list[Event]) -> tuple[list, float]:
    """Clients stream completions back to back; the events fire `gap` seconds apart meanwhile."""
    import httpx

    from open_autoglm.bench.serving import send_request

    headers = {"Authorization": f"Bearer {args.api_key}"}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    results: list = []
    stop = asyncio.Event()
    rng = random.Random(args.seed)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=httpx.Timeout(3600, connect=30)) as client:
        model = (await client.get(url + "/v1/models")).json()["data"][0]["id"]
        t0 = time.perf_counter()

        async def one_client() -> None:
            while not stop.is_set():
                prompt = [rng.randrange(args.min_token_id, args.vocab_size) for _ in range(args.input_len)]
                spread = int(args.output_len * args.output_jitter)  # unequal lengths: clients do not march in step
                max_tokens = max(1, args.output_len + rng.randint(-spread, spread))
                payload = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                           "ignore_eos": True, "stream": True}
                results.append(await send_request(client, url + "/v1/completions", payload, t0))

        clients = [asyncio.create_task(one_client()) for _ in range(args.clients)]
        await asyncio.sleep(args.warmup + args.gap)
        for event in events:
            event.start = time.perf_counter() - t0
            response = await client.post(url + event.route, json=event.body, timeout=3600)
            event.end = time.perf_counter() - t0
            event.status, event.report = response.status_code, response.json()
            print(f"  {event.label}: HTTP {event.status} in {event.end - event.start:.2f}s", file=sys.stderr)
            await asyncio.sleep(args.gap)
        stop.set()
        await asyncio.gather(*clients)
        return results, time.perf_counter() - t0


# -- cold start ------------------------------------------------------------------------------------------------
def cold_start(args, model: Path, registry_root: Path, name: str, server_args: list[str]) -> list[dict]:
    """Per load_strategy: spawn -> /health 200, then the first request's TTFT; resident also times a
    switch to a preloaded version."""
    import httpx

    rows = []
    headers = {"Authorization": f"Bearer {args.api_key}"}
    for strategy in args.strategies.split(","):
        time.sleep(3.0)  # let the previous server's exit settle
        server = Server(model, _free_port(), args.api_key, [*server_args, "--load-strategy", strategy])
        try:
            ready = server.wait_ready()
            t = time.perf_counter()
            body = {"prompt": list(range(args.min_token_id, args.min_token_id + args.input_len)), "max_tokens": 1,
                    "temperature": 0}
            httpx.post(server.url + "/v1/completions", json=body, headers=headers, timeout=3600).raise_for_status()
            row = {"strategy": strategy, "ready_s": ready, "first_ttft_s": time.perf_counter() - t}
            if strategy == "resident":
                src = {"model": name, "version": "v2", "registry": str(registry_root), "warmup_prompts": []}
                httpx.post(server.url + "/admin/preload", json=src, headers=headers, timeout=3600).raise_for_status()
                r = httpx.post(server.url + "/admin/update", json=src, headers=headers, timeout=3600)
                row["switch_to_resident_s"] = r.json()["seconds"]["total"]
                t = time.perf_counter()
                httpx.post(server.url + "/v1/completions", json=body, headers=headers, timeout=3600)
                row["ttft_after_switch_s"] = time.perf_counter() - t
            rows.append(row)
        finally:
            server.stop()
    return rows


# -- command -------------------------------------------------------------------------------------------
def add_bench_update_parser(bench_subparsers) -> argparse.ArgumentParser:
    p = bench_subparsers.add_parser("update", help="live weight updates under streaming load: swap, deltas, rollback",
                                    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder (default: the cached smollm2-135m)")
    p.add_argument("--clients", type=int, default=32, help="concurrent streaming clients (default: 32)")
    p.add_argument("--input-len", type=int, default=32, help="prompt tokens (default: 32)")
    p.add_argument("--output-len", type=int, default=32, help="mean output tokens per request (default: 32)")
    p.add_argument("--output-jitter", type=float, default=0.5,
                   help="output lengths vary uniformly by this fraction around --output-len (default: 0.5)")
    p.add_argument("--policy", choices=("drain", "recompute", "abort"), default="drain", help="in-flight policy")
    p.add_argument("--warmup", type=float, default=10.0, help="seconds of load before the window of the first update")
    p.add_argument("--gap", type=float, default=20.0, help="seconds between updates (default: 20)")
    p.add_argument("--window", type=float, default=None, help="before/after windows in seconds (default: gap / 2)")
    p.add_argument("--registry", default=None, help="registry root for the variants (default: a temporary folder)")
    p.add_argument("--server-arg", action="append", default=[], help="extra `autoglm serve` option (repeat)")
    p.add_argument("--device", default="auto", help="server device (default: auto)")
    p.add_argument("--api-key", default="bench-update-key", help="API key of the server we start")
    p.add_argument("--vocab-size", type=int, default=None, help="prompt token ids below this (default: the model's)")
    p.add_argument("--min-token-id", type=int, default=100, help="prompt token ids from here (skip special tokens)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cold-start", action="store_true", help="also time start-up per load strategy")
    p.add_argument("--strategies", default="prewarm,lazy,resident", help="load strategies for --cold-start")
    p.add_argument("--json", default=None, help="write the full report (JSON) here")
    p.add_argument("--plot", default="bench_update.png", help="PNG of latency over time (default: bench_update.png)")
    p.set_defaults(func=cmd_bench_update)
    return p


def cmd_bench_update(args: argparse.Namespace) -> int:
    import json
    import tempfile

    from open_autoglm.bench import update_report as rep
    from open_autoglm.models.catalog import resolve_model
    from open_autoglm.registry import Registry

    base = Path(resolve_model(args.model, None))
    args.vocab_size = args.vocab_size or json.loads((base / "config.json").read_text())["vocab_size"]
    args.window = args.window or args.gap / 2
    tmp = tempfile.TemporaryDirectory(prefix="autoglm-bench-update-")
    root = Path(args.registry) if args.registry else Path(tmp.name) / "registry"
    name = f"bench-{base.name}"
    print(f"preparing versions of {base} in {root} ...", file=sys.stderr)
    events = _events(prepare_versions(base, root, name, args.seed), name, root, args.policy)
    server_args = ["--device", args.device, *args.server_arg]
    v1 = Registry(root).resolve(name, "v1")
    results, duration = _serve_and_load(args, v1, server_args, events)
    rows = rep.analyze(results, events, args.window)
    failed = sum(1 for r in results if not r.ok)
    report = {"model": str(base), "device": args.device, "clients": args.clients, "input_len": args.input_len,
              "output_len": args.output_len, "policy": args.policy, "duration_s": duration,
              "requests": len(results), "failed": failed,
              "model_bytes": next((r["model_bytes"] for r in rows if r["model_bytes"]), None), "rows": rows,
              "events": [asdict(e) for e in events]}
    report["targets"] = rep.check_targets(rows, failed)
    rep.print_summary(report)
    if args.cold_start:
        report["cold_start"] = cold_start(args, v1, root, name, server_args)
        rep.print_cold_start(report["cold_start"])
    if args.plot:
        rep.plot_timeline(results, events, args.plot,
                          f"{base.name}: {args.clients} streaming clients, policy {args.policy}")
        print(f"\nplot: {args.plot}")
    if args.json:
        report["results"] = [asdict(r) for r in results]
        Path(args.json).write_text(json.dumps(report, indent=1))
    tmp.cleanup()
    return 0 if failed == 0 and all(e.status == 200 for e in events) else 1


def _events(targets: dict[str, str], name: str, root: Path, policy: str) -> list[Event]:
    src = {"model": name, "registry": str(root), "policy": policy}
    return [Event("full swap", "/admin/update", {**src, "version": targets["full swap"], "mode": "full"}),
            Event("delta 1%", "/admin/update", {**src, "version": targets["delta 1%"], "mode": "delta"}),
            Event("delta 10%", "/admin/update", {**src, "version": targets["delta 10%"], "mode": "delta"}),
            Event("rollback", "/admin/rollback", {"policy": policy})]


def _serve_and_load(args, model: Path, server_args: list[str], events: list[Event]) -> tuple[list, float]:
    """Start a server on `model`, run the load and the events against it, stop it."""
    server = Server(model, _free_port(), args.api_key, server_args)
    try:
        ready = server.wait_ready()
        print(f"server ready in {ready:.1f}s; {args.clients} clients, in {args.input_len} / out {args.output_len}",
              file=sys.stderr)
        return asyncio.run(run_load(args, server.url, events))
    finally:
        server.stop()
