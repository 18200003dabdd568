"""`autoglm bench update`, the read-out: latency windows around each update, the table, the
pass/fail targets and the timeline plot (bench/update.py runs the load and the updates).

    window  | TTFT / ITL samples counted
    before  | ending in the `--window` seconds before the admin call
    during  | whose wait overlaps the admin call (start -> answer)
    after   | ending in the `--window` seconds after the answer
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from open_autoglm.bench.update import Event


def _pcts(values: list[float]) -> dict:
    from open_autoglm.bench.serving import percentile

    ordered = sorted(values)
    if not ordered:
        return {"n": 0, "p50": None, "p99": None}
    return {"n": len(ordered), "p50": 1e3 * percentile(ordered, 50), "p99": 1e3 * percentile(ordered, 99)}


def latency_windows(results: list, lo: float, hi: float, overlap: bool) -> dict:
    """TTFT and ITL samples of the window [lo, hi]: those whose wait overlaps it (overlap=True), or
    that end inside it."""
    def inside(a: float, b: float) -> bool:
        return (a <= hi and b >= lo) if overlap else lo <= b <= hi

    ttft, itl = [], []
    for r in results:
        if not r.ok:
            continue
        if r.ttft is not None and inside(r.start, r.start + r.ttft):
            ttft.append(r.ttft)
        times = r.chunk_times
        itl += [b - a for a, b in zip(times, times[1:]) if inside(a, b)]
    return {"ttft": _pcts(ttft), "itl": _pcts(itl)}


def analyze(results: list, events: list[Event], window: float) -> list[dict]:
    rows = []
    for ev in events:
        rep = ev.report if ev.status == 200 else {}
        secs = rep.get("seconds", {})
        failed = sum(1 for r in results if not r.ok and r.start < ev.end + window and
                     r.start + r.e2e > ev.start - window)
        rows.append({
            "update": ev.label, "to": rep.get("to_version", "-"), "status": ev.status,
            "policy": rep.get("policy"), "staging": rep.get("staging"),
            "seconds": secs.get("total"), "work_seconds": (secs.get("total", 0) - secs.get("drain", 0)) if secs else None,
            "switch_ms": 1e3 * secs["switch"] if "switch" in secs else None,
            "bytes_moved": rep.get("bytes_moved"), "model_bytes": rep.get("model_bytes") or None,
            "failed_requests": failed, "error": None if ev.status == 200 else ev.report.get("error"),
            "before": latency_windows(results, ev.start - window, ev.start, overlap=False),
            "during": latency_windows(results, ev.start, ev.end, overlap=True),
            "after": latency_windows(results, ev.end, ev.end + window, overlap=False),
        })
    return rows


def _ms(x) -> str:
    return "-" if x is None else f"{x:.0f}"


def format_table(rows: list[dict], model_bytes: int | None) -> str:
    head = ("| update | to | duration s (work / switch ms) | bytes moved | failed | TTFT p50/p99 ms before · during · after "
            "| ITL p50/p99 ms before · during · after |")
    lines = [head, "|" + "---|" * 7]
    for r in rows:
        moved = r["bytes_moved"]
        share = f" ({100 * moved / model_bytes:.1f}%)" if moved and model_bytes else ""
        dur = "-" if r["seconds"] is None else f"{r['seconds']:.2f} ({r['work_seconds']:.2f} / {_ms(r['switch_ms'])})"
        lat = {k: " · ".join(f"{_ms(r[w][k]['p50'])}/{_ms(r[w][k]['p99'])}" for w in ("before", "during", "after"))
               for k in ("ttft", "itl")}
        lines.append(f"| {r['update']} | {r['to']} | {dur} | {(moved or 0) / 2**20:.2f} MiB{share} | "
                     f"{r['failed_requests']} | {lat['ttft']} | {lat['itl']} |")
    return "\n".join(lines)


def check_targets(rows: list[dict], total_failed: int) -> list[tuple[str, bool, str]]:
    by = {r["update"]: r for r in rows}
    out = [("0 failed requests", total_failed == 0, f"{total_failed} failed")]
    for r in rows:
        before, during = r["before"]["itl"]["p99"], r["during"]["itl"]["p99"]
        if before and during:
            out.append((f"{r['update']}: p99 ITL during <= 2x steady", during <= 2 * before,
                        f"{during:.0f} ms vs {before:.0f} ms"))
    full, small = by.get("full swap"), by.get("delta 1%")
    if full and small and small["bytes_moved"] and small["model_bytes"]:
        share = small["bytes_moved"] / small["model_bytes"]
        out.append(("1% delta moves <= 2% of the model", share <= 0.02, f"{100 * share:.2f}%"))
    if full and small and full["work_seconds"] and small["work_seconds"] is not None:
        ratio = small["work_seconds"] / full["work_seconds"]
        out.append(("1% delta takes <= 10% of the full swap", ratio <= 0.10,
                    f"{small['work_seconds']:.3f}s vs {full['work_seconds']:.3f}s ({100 * ratio:.1f}%)"))
    return out


def plot_timeline(results: list, events: list[Event], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(12, 7), sharex=True)
    ok = [r for r in results if r.ok]
    xs = [b for r in ok for b in r.chunk_times[1:]]
    ys = [1e3 * (b - a) for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    ax1.scatter(xs, ys, s=3, alpha=0.4)
    ax1.set_ylabel("inter-token latency (ms)")
    ax1.set_yscale("log")
    ax2.scatter([r.start for r in ok if r.ttft is not None], [1e3 * r.ttft for r in ok if r.ttft is not None], s=6)
    bad = [r for r in results if not r.ok]
    if bad:
        ax2.scatter([r.start for r in bad], [1e3 * r.e2e for r in bad], marker="x", color="red", label="failed")
        ax2.legend()
    ax2.set_ylabel("time to first token (ms)")
    ax2.set_yscale("log")
    ax2.set_xlabel("time since start (s)")
    for i, ev in enumerate(events):
        for ax in (ax1, ax2):
            ax.axvspan(ev.start, max(ev.end, ev.start + 0.05), color=f"C{i + 1}", alpha=0.25)
            ax.axvline(ev.start, color=f"C{i + 1}", linewidth=1)
        ax1.text(ev.start, ax1.get_ylim()[1], f" {ev.label}", color=f"C{i + 1}", va="top", fontsize=9)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)



def print_summary(report: dict) -> None:
    """The table and the targets (report = what cmd_bench_update writes to --json)."""
    rows, failed, model_bytes = report["rows"], report["failed"], report["model_bytes"]
    print(f"\n{report['requests']} requests, {failed} failed, {report['duration_s']:.0f}s; "
          f"model {(model_bytes or 0) / 2**20:.0f} MiB\n")
    print(format_table(rows, model_bytes))
    print("\ntargets:")
    for what, ok, detail in report["targets"]:
        print(f"  [{'PASS' if ok else 'FAIL'}] {what}: {detail}")


def print_cold_start(rows: list[dict]) -> None:
    print("\n| load strategy | ready (s) | first TTFT (s) | switch to resident (s) |\n|---|---|---|---|")
    for c in rows:
        print(f"| {c['strategy']} | {c['ready_s']:.2f} | {c['first_ttft_s']:.2f} | "
              f"{c.get('switch_to_resident_s', float('nan')):.3f} |")
