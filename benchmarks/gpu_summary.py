"""Merge the GPU suite's JSON reports into one file and print the short table against the targets.

    python benchmarks/gpu_summary.py DIR OUT.json     (DIR holds the *.json the suite wrote)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def load(directory: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))}


def rows(reports: dict[str, dict]) -> list[tuple[str, str, str, str]]:
    """(what, figure, target, ok) per measured figure."""
    out = []
    for name, target in (("latency_qwen", 60), ("latency_llama", 80)):
        r = reports.get(name)
        if r:
            ours = r["rows"][0]
            peers = "; ".join(f"{_short(p['system'])} {p['decode_tok_s']:.0f}" for p in r["rows"][1:])
            pct, floor = ours.get("pct_of_floor") or 0, r.get("floor_tok_s") or 0
            fig = f"{ours['decode_tok_s']:.0f} tok/s = {pct:.0f}% of {floor:.0f}" + (f" ({peers})" if peers else "")
            out.append((name, fig, f">= {target}% floor", _ok(pct >= target)))
    for name, target in (("throughput_qwen", 20000), ("throughput_llama", 6000)):
        r = reports.get(name)
        if r:
            ours = r["results"][0]["output_tok_s"]
            ratio = next(iter(r["ratios"].values()), None)
            fig = f"{ours:.0f} out tok/s" + (f", {ratio:.1f}x HF generate_batch" if ratio else "")
            ok = ours >= target and (ratio is None or name != "throughput_qwen" or ratio >= 15)
            out.append((name, fig, f">= {target} tok/s" + (" & 15x HF" if name == "throughput_qwen" else ""), _ok(ok)))
    r = reports.get("prefix_qwen")
    if r:
        off, on = r["rows"]
        fig = f"TTFT {1e3 * off['mean_ttft_s']:.0f} -> {1e3 * on['mean_ttft_s']:.0f} ms = {r['ttft_speedup']:.1f}x"
        out.append(("prefix_qwen", fig, ">= 5x lower", _ok(r["ttft_speedup"] >= 5)))
    for name in ("startup_cold", "startup_warm", "startup_offline"):
        r = reports.get(name)
        if r:
            e = r["engine"]
            st, m = e["stages"], e["memory"]
            fig = (f"engine {e['wall_to_first_token_s']:.1f}s (import {st['import_s']:.1f}, "
                   f"cfg {st.get('config_s', 0):.1f} tok {st.get('tokenizer_s', 0):.1f}, "
                   f"cuda {st.get('attention_backend_cuda_init_s', 0):.1f}, "
                   f"model {st.get('build_model_s', 0):.1f}, warm-up {m['warmup_s']:.1f}, kv {m['kv_alloc_s']:.2f}, "
                   f"graphs {m['graph_capture_s']:.1f})")
            if "serve" in r:
                fig += f"; serve {r['serve']['wall_to_first_token_s']:.1f}s"
            worst = max(e["wall_to_first_token_s"], r.get("serve", {}).get("wall_to_first_token_s", 0))
            out.append((name, fig, "<= 15 s", _ok(worst <= 15)))
    return out


def memory_rows(reports: dict[str, dict]) -> list[str]:
    lines = []
    for name, r in reports.items():
        m = r.get("memory") or r.get("engine", {}).get("memory")
        if m:
            lines.append(f"{name:<18} peak {m.get('peak_gpu_gib', 0):.1f} GiB, KV {m['kv_tokens']} tokens "
                         f"({m['kv_gib']:.1f} GiB), graphs {m['graph_capture_s']:.1f}s")
    return lines


def _short(system: str) -> str:
    return {"open-autoglm (cuBLAS GEMV)": "cuBLAS", "open-autoglm (Triton GEMV)": "Triton"}.get(system, system[:8])


def _ok(ok: bool) -> str:
    return "yes" if ok else "MISS"


def main() -> int:
    directory, out = Path(sys.argv[1]), Path(sys.argv[2])
    reports = load(directory)
    out.write_text(json.dumps(reports, indent=1, default=str))
    any_report = next(iter(reports.values()), {})
    print(f"\ndevice: {any_report.get('device')}; versions: {any_report.get('versions')}")
    print("\n".join(memory_rows(reports)))
    print(f"\n{'benchmark':<18} {'figure':<100} {'target':<24} ok")
    for name, fig, target, ok in rows(reports):
        print(f"{name:<18} {fig:<100} {target:<24} {ok}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
