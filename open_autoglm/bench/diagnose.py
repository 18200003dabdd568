"""Where a batch-1 decode step's time goes: GPU time of the graph vs the whole step, and kernels.

    graph_ms  = one replay of the batch-1 CUDA graph, CUDA events (the last step's inputs)
    host_ms   = median time per token (what a user sees) - graph_ms: the serial host part
    kernels   = one eager decode step under torch.profiler, GPU time summed by kernel name
                (eager adds launch gaps between kernels, not time inside them)
"""

from __future__ import annotations

import statistics


def graph_step_ms(engine, repeats: int = 30) -> float | None:
    import torch

    graphs = engine.runner.graphs
    if graphs is None or 1 not in graphs.graphs:
        return None
    graph = graphs.graphs[1]
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def kernel_breakdown(engine, top: int = 14) -> list[dict]:
    """GPU time per kernel name of one eager batch-1 decode step (the graph's own inputs)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    graphs = engine.runner.graphs
    if graphs is None or 1 not in graphs.graphs:
        return []
    with torch.inference_mode():
        graphs._forward(1)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            graphs._forward(1)
            torch.cuda.synchronize()
    rows = []
    for event in prof.key_averages():
        gpu_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if gpu_us > 0 and event.count > 0:
            rows.append({"kernel": event.key[:70], "calls": event.count, "gpu_us": gpu_us})
    rows.sort(key=lambda r: -r["gpu_us"])
    return rows[:top]


def print_breakdown(rows: list[dict], graph_ms: float | None, tpot_ms: float) -> None:
    if graph_ms is not None:
        print(f"step: {tpot_ms:.3f} ms per token = graph (GPU) {graph_ms:.3f} ms + host {tpot_ms - graph_ms:.3f} ms")
    if rows:
        total = sum(r["gpu_us"] for r in rows)
        print(f"{'kernel (one eager step, top by GPU time)':<72} {'calls':>6} {'us':>9} {'us/call':>8}")
        for r in rows:
            print(f"{r['kernel']:<72} {r['calls']:>6} {r['gpu_us']:>9.1f} {r['gpu_us'] / r['calls']:>8.2f}")
        print(f"{'sum of the above':<72} {'':>6} {total:>9.1f}")
