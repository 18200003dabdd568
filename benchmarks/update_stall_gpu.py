"""Where do engine steps stall while a live update stages? (issue 5 diagnostic, run on the lent GPU)

    python3 benchmarks/update_stall_gpu.py WORK_DIR OUT_JSON

An AsyncEngine keeps 32 sequences decoding (Qwen2.5-1.5B shape, random bf16 weights); meanwhile the
caller's thread runs the bench's four updates (full swap, 1 % delta, 10 % delta, rollback; policy
recompute so nothing waits on a drain). Every engine step is timed, and so is every call of the
update path's functions (patched in place, on any thread). Printed: per update, steady vs during
step times, and the update-thread calls that overlap the slowest steps. Then micro-probes: one
host/driver operation at a time on a side thread (page-locked allocation, pageable / pinned /
mapped-file copies, cudaMalloc, hashing) with the max step time while it runs.
"""

from __future__ import annotations

import functools
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

EVENTS: list[tuple[str, str, float, float]] = []   # (name, thread, t0, t1)
STEPS: list[tuple[float, float]] = []               # engine steps (t0, t1)


def timed(owner, attr: str, label: str | None = None) -> None:
    fn = getattr(owner, attr)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            EVENTS.append((label or attr, threading.current_thread().name, t0, time.perf_counter()))

    setattr(owner, attr, wrapper)


def instrument(engine) -> None:
    from open_autoglm.engine import update_state
    from open_autoglm.models import loader
    from open_autoglm.worker import update_loading
    from open_autoglm.worker import updates as wu

    for name in ("hash_bytes", "_copy_staged", "load_verified", "verify_files", "read_changed"):
        timed(update_loading, name)
    for name in ("build_shadow", "warmup", "snapshot", "stage_patch", "copy_patch", "patched_params",
                 "tensor_from_bytes"):
        timed(wu, name)
    timed(loader, "open_source")
    timed(update_state.HeldWeights, "backup_for")
    from open_autoglm.engine import update_plans
    from open_autoglm.registry import Registry
    from open_autoglm.registry.manifest import Manifest
    from open_autoglm.worker import transfer

    for name in ("_h2d", "_d2h", "to_host"):
        timed(transfer, name)
    timed(wu, "on_device")
    for name in ("diff_manifests", "read_changed", "compute_manifest"):
        timed(update_plans, name)
    for name in ("resolve", "_warm_up_patch", "_stage_registry_diff", "_live_manifest", "_check_config",
                 "_identity_after_delta", "_staging_device"):
        timed(update_plans.UpdatePlanner, name)
    timed(Registry, "resolve", "Registry.resolve")
    timed(Manifest, "load", "Manifest.load")
    empty_like = torch.empty_like

    def timed_empty_like(*args, **kwargs):  # device allocations on the update thread (cudaMalloc?)
        t0 = time.perf_counter()
        out = empty_like(*args, **kwargs)
        if out.is_cuda and threading.current_thread().name != "autoglm-engine":
            EVENTS.append(("torch.empty_like(cuda)", threading.current_thread().name, t0, time.perf_counter()))
        return out

    torch.empty_like = timed_empty_like
    step = engine.step

    def timed_step():
        t0 = time.perf_counter()
        out = step()
        STEPS.append((t0, time.perf_counter()))
        return out

    engine.step = timed_step


def steps_between(t0: float, t1: float) -> list[float]:
    return [b - a for a, b in STEPS if a >= t0 and b <= t1]


def summarize(label: str, t0: float, t1: float, before: tuple[float, float]) -> dict:
    base = steps_between(*before)
    during = steps_between(t0, t1)
    med = statistics.median(base) if base else 0.0
    slow = sorted(((b - a, a, b) for a, b in STEPS if a >= t0 and b <= t1), reverse=True)[:6]
    rows = []
    for dur, a, b in slow:
        over = [(n, e1 - e0) for n, th, e0, e1 in EVENTS if th != "autoglm-engine" and e0 < b and e1 > a]
        agg: dict[str, list[float]] = {}
        for n, d in over:
            agg.setdefault(n, []).append(d)
        rows.append({"step_ms": round(1e3 * dur, 1),
                     "overlapping": {n: [len(ds), round(1e3 * max(ds), 1)] for n, ds in agg.items()}})
    out = {"update": label, "seconds": round(t1 - t0, 3), "steady_median_ms": round(1e3 * med, 2),
           "steady_p99_ms": round(1e3 * sorted(base)[int(0.99 * (len(base) - 1))], 2) if base else None,
           "during_steps": len(during),
           "during_p50_ms": round(1e3 * statistics.median(during), 2) if during else None,
           "during_p99_ms": round(1e3 * sorted(during)[int(0.99 * (len(during) - 1))], 2) if during else None,
           "during_max_ms": round(1e3 * max(during), 1) if during else None, "slowest": rows}
    print(json.dumps(out, indent=1), flush=True)
    return out


def keep_busy(aeng, n: int, prompt_len: int, vocab: int) -> None:
    from open_autoglm.sampling_params import SamplingParams

    def top_up(engine) -> None:
        missing = n - len(engine.scheduler.running) - len(engine.scheduler.waiting)
        g = torch.Generator().manual_seed(len(STEPS))
        for _ in range(max(0, missing)):
            ids = torch.randint(min(1000, vocab // 2), vocab, (prompt_len,), generator=g).tolist()
            engine.add_request(ids, SamplingParams(max_tokens=1500, temperature=0, ignore_eos=True))

    aeng.submit(top_up).result()


def probes(aeng, ckpt: Path, vocab: int) -> list[dict]:
    """One operation at a time on this thread while the engine thread decodes."""
    from open_autoglm.registry.safetensors_io import MappedFile, hash_bytes

    dev = torch.device("cuda")
    n = 512 << 20
    side = torch.cuda.Stream(dev)
    shard = sorted(ckpt.glob("*.safetensors"))[0]
    results = []

    def run(name, fn, reps=3):
        for i in range(reps):
            keep_busy(aeng, 32, 128, vocab)
            time.sleep(0.3)
            t0 = time.perf_counter()
            fn(i)
            t1 = time.perf_counter()
            time.sleep(0.05)
            during = [b - a for a, b in STEPS if b > t0 and a < t1]
            base = [b - a for a, b in STEPS if t0 - 0.3 <= a and b <= t0]
            r = {"probe": name, "rep": i, "op_ms": round(1e3 * (t1 - t0), 1),
                 "base_median_ms": round(1e3 * statistics.median(base), 2) if base else None,
                 "max_step_ms": round(1e3 * max(during), 1) if during else None, "steps": len(during)}
            print(json.dumps(r), flush=True)
            results.append(r)

    with torch.cuda.stream(side):
        run("pinned alloc 512MB", lambda i: torch.empty(n + (i + 1) * 4096, dtype=torch.uint8, pin_memory=True))
        pinned = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        pageable = torch.ones(n, dtype=torch.uint8)
        dst = torch.empty(n, dtype=torch.uint8, device=dev)
        run("H2D pinned 512MB", lambda i: (dst.copy_(pinned, non_blocking=True), side.synchronize()))
        run("H2D pageable 512MB", lambda i: (dst.copy_(pageable), side.synchronize()))
        run("D2H pinned 512MB", lambda i: (pinned.copy_(dst, non_blocking=True), side.synchronize()))
        run("D2H pageable 512MB", lambda i: (pageable.copy_(dst), side.synchronize()))
        with MappedFile(shard) as mf:
            info = max(mf.header.tensors.values(), key=lambda t: t.nbytes)
            view = mf.view(info)
            src = torch.frombuffer(view, dtype=torch.uint8)
            d2 = torch.empty(info.nbytes, dtype=torch.uint8, device=dev)
            run(f"H2D mmap {info.nbytes >> 20}MB", lambda i, s=src: (d2.copy_(s), side.synchronize()))
            run(f"xxh3 mmap {info.nbytes >> 20}MB", lambda i, v=view: hash_bytes(v))
            del src, view
        run("cudaMalloc 512MB + free + empty_cache",
            lambda i: (torch.empty(n + (i + 1) * (2 << 20), dtype=torch.uint8, device=dev), torch.cuda.empty_cache()))
        chunk = torch.empty(64 << 20, dtype=torch.uint8, pin_memory=True)

        def chunked_d2h(i):
            for off in range(0, n, 64 << 20):
                chunk.copy_(dst[off:off + (64 << 20)], non_blocking=True)
                side.synchronize()
        run("D2H 512MB via one 64MB pinned chunk", chunked_d2h)
        run("D2D clone 512MB", lambda i: (dst.clone(), side.synchronize()))
    return results


def main() -> int:
    import os

    work, out_json = Path(sys.argv[1]), Path(sys.argv[2])
    from open_autoglm.bench.update import prepare_versions
    from open_autoglm.config import EngineConfig
    from open_autoglm.engine.async_engine import AsyncEngine
    from open_autoglm.engine.llm_engine import LLMEngine
    from open_autoglm.engine.update_state import UpdateSource
    from open_autoglm.models.arch_configs import write_random_checkpoint

    device = os.environ.get("DIAG_DEVICE", "cuda")  # DIAG_CKPT + DIAG_DEVICE=cpu: a smoke test of this script
    ckpt = Path(os.environ["DIAG_CKPT"]) if "DIAG_CKPT" in os.environ else write_random_checkpoint("qwen2.5-1.5b", work)
    registry = work / "registry"
    if not registry.exists():
        prepare_versions(ckpt, registry, "qwen")
    t = time.perf_counter()
    from open_autoglm.registry import Registry

    v1 = Registry(registry).resolve("qwen", "v1")
    engine = LLMEngine(EngineConfig(model=str(v1), device=device, max_model_len=2048))
    print(f"engine ready in {time.perf_counter() - t:.1f} s", flush=True)
    vocab = engine.hf_config.vocab_size
    instrument(engine)
    aeng = AsyncEngine(engine=engine)
    aeng.ready.wait()
    report = {"updates": [], "probes": []}
    plan = [("full swap", "v2", "full"), ("delta 1%", "v3", "auto"), ("delta 10%", "v4", "auto"), ("rollback", None, None)]
    for label, version, mode in plan:
        keep_busy(aeng, 32, 128, vocab)
        time.sleep(2.0)
        before = (time.perf_counter() - 1.5, time.perf_counter())
        EVENTS.clear()
        t0 = time.perf_counter()
        if version is None:
            rep = engine.updates.rollback("recompute", driver=aeng)
        else:
            rep = engine.updates.update(UpdateSource(model="qwen", version=version, registry=str(registry)),
                                        "recompute", mode="full" if mode == "full" else "delta", driver=aeng)
        t1 = time.perf_counter()
        s = summarize(label, t0, t1, before)
        s["report_seconds"] = rep.seconds
        s["staging"] = rep.staging
        report["updates"].append(s)
        totals: dict[str, float] = {}
        for n, th, e0, e1 in EVENTS:
            if th != "autoglm-engine":
                totals[n] = totals.get(n, 0.0) + (e1 - e0)
        s["update_thread_ms"] = {k: round(1e3 * v, 1) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}
        print("update-thread time by call:", s["update_thread_ms"], "report stages:", rep.seconds, flush=True)
    if device == "cuda":
        report["probes"] = probes(aeng, ckpt, vocab)
    aeng.shutdown()
    out_json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
