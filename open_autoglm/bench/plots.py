"""PNG figures of benchmark reports (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math


def plot_serving(report: dict, path: str) -> None:
    """Four panels: TTFT and ITL distributions, e2e latency by send time, output tokens/s over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in report["requests"] if r["ok"]]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    cfg = report["config"]
    load = f"rate {cfg['request_rate']}/s" if cfg["request_rate"] else f"concurrency {cfg['concurrency'] or 'all'}"
    fig.suptitle(f"{cfg['model']}: {report['completed']}/{cfg['num_prompts']} ok, in {cfg['input_len']} / "
                 f"out {cfg['output_len']}, {load}", fontsize=11)

    _histogram(axes[0][0], [1e3 * r["ttft"] for r in ok if r["ttft"] is not None], "time to first token (ms)",
               report["ttft_ms"])
    _histogram(axes[0][1], [1e3 * g for r in ok for g in r["itls"]], "inter-token latency (ms)", report["itl_ms"])

    ax = axes[1][0]
    ax.scatter([r["start"] for r in ok], [1e3 * r["e2e"] for r in ok], s=8, alpha=0.7)
    failed = [r for r in report["requests"] if not r["ok"]]
    if failed:
        ax.scatter([r["start"] for r in failed], [1e3 * r["e2e"] for r in failed], s=12, marker="x", color="red",
                   label=f"failed ({len(failed)})")
        ax.legend(fontsize=8)
    ax.set_xlabel("send time (s)")
    ax.set_ylabel("end-to-end latency (ms)")

    ax = axes[1][1]
    times = sorted(t for r in ok for t in r["chunk_times"])
    if times:
        width = max(report["duration_s"] / 40, 0.05)
        bins = max(1, math.ceil(times[-1] / width))
        counts = [0] * bins
        for t in times:
            counts[min(bins - 1, int(t / width))] += 1
        ax.plot([(i + 0.5) * width for i in range(bins)], [c / width for c in counts])
    ax.set_xlabel("time (s)")
    ax.set_ylabel("streamed chunks / s (~ output tokens / s)")

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _histogram(ax, values: list[float], label: str, summary: dict) -> None:
    if values:
        ax.hist(values, bins=min(40, max(5, len(values) // 3)), color="tab:blue", alpha=0.8)
        for key, style in (("median", "--"), ("p99", ":")):
            if summary.get(key) is not None:
                ax.axvline(summary[key], color="black", linestyle=style, label=f"{key} {summary[key]:.1f} ms")
        ax.legend(fontsize=8)
    ax.set_xlabel(label)
    ax.set_ylabel("count")
