"""What every benchmark shares: the model under test, the machine's ceilings, the report."""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--random-weights", action="store_true",
                        help="random weights of a real architecture (see --arch-config); nothing is downloaded")
    parser.add_argument("--arch-config", default="qwen2.5-1.5b",
                        help="architecture for --random-weights: qwen2.5-1.5b or llama-3.1-8b")
    parser.add_argument("--json", default=None, help="write the full report (JSON) here")
    parser.add_argument("--plot", default=None, help="write a PNG plot here")


def apply_model_args(args: argparse.Namespace) -> None:
    """--random-weights: point --model at a config-only folder and load random weights."""
    if args.random_weights:
        from open_autoglm.models.arch_configs import random_model_folder

        folder = random_model_folder(args.arch_config, Path(tempfile.gettempdir()) / "autoglm-arch")
        args.model = str(folder)
        args.load_format = "dummy"


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def versions() -> dict[str, str]:
    import torch
    import transformers

    out = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        pass
    return out


def measure_ceilings() -> dict[str, float]:
    """Memory bandwidth (device-to-device copy, bytes read + written) and bf16 matmul rate."""
    import torch

    if not torch.cuda.is_available():
        return {}
    n, m = 1 << 30, 8192  # a 1 GiB copy; an m x m x m bf16 product
    copy_s = _time_cuda(_copy_fn(n))
    mm_s = _time_cuda(_matmul_fn(m))
    torch.cuda.empty_cache()
    return {"bandwidth_bytes_s": 2 * n / copy_s, "bf16_flop_s": 2 * m**3 / mm_s}


def _copy_fn(n: int):
    import torch

    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def _matmul_fn(m: int):
    import torch

    a = torch.randn(m, m, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(m, m, dtype=torch.bfloat16, device="cuda")
    return lambda: a @ b


def _time_cuda(fn, repeats: int = 20) -> float:
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def decode_bytes_per_step(model, kv_bytes_per_token: int, context_len: int) -> int:
    """Bytes a decode step must read at least: every weight once (an untied embedding table is
    only gathered, so it does not count) plus the KV cache of the context."""
    seen, total = set(), 0
    tied = getattr(model.config, "tie_word_embeddings", False)
    for name, p in model.named_parameters():
        if id(p) in seen or (name.endswith("embed_tokens.weight") and not tied):
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
    return total + kv_bytes_per_token * context_len


def write_report(path: str | None, report: dict) -> None:
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "device": device_name(), "versions": versions()} | report
    if path:
        Path(path).write_text(json.dumps(report, indent=2, default=str))


def memory_report(engine) -> dict:
    """KV capacity, peak GPU memory and start-up times of an engine: printed with every benchmark."""
    import torch

    bm, runner = engine.block_manager, engine.runner
    stats = {
        "kv_blocks": bm.num_blocks, "kv_tokens": bm.num_blocks * bm.block_size,
        "kv_gib": bm.num_blocks * runner.kv_spec.bytes_per_block / 2**30,
        "max_concurrent_seqs_at_max_len": bm.num_blocks * bm.block_size // engine.max_model_len,
        "load_s": engine.load_seconds, "warmup_s": runner.warmup_seconds, "kv_alloc_s": runner.kv_alloc_seconds,
        "graph_capture_s": engine.graph_capture_seconds,
    }
    if torch.cuda.is_available():
        stats["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
        stats["gpu_total_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    return stats


def format_stats(stats: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in stats.items())
