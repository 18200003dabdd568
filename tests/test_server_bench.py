"""`bench serve` against a real server: report fields, counts, the plot."""

from __future__ import annotations

import json

import pytest
from test_server_harness import API_KEY, MAIN_ARGS, shared_server

from open_autoglm.bench.serving import main, percentile, summarize


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    return shared_server(tiny_checkpoint("llama"), *MAIN_ARGS)


def test_percentile_and_summary_match_numpy_linear():
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([float(i) for i in range(101)], 99) == 99.0
    assert summarize([0.001, 0.003]) == {"mean": 2.0, "median": 2.0, "p99": pytest.approx(2.98)}
    assert summarize([]) == {"mean": None, "median": None, "p99": None}


@pytest.mark.parametrize("load", [["--concurrency", "3"], ["--request-rate", "50"]])
def test_bench_serve_reports_latencies_and_throughput(server, tmp_path, load):
    out, plot = tmp_path / "report.json", tmp_path / "plot.png"
    code = main(["--url", server.url, "--api-key", API_KEY, "--num-prompts", "6", "--input-len", "8",
                 "--output-len", "5", *load, "--out", str(out), "--plot", str(plot)])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["completed"] == 6 and report["failed"] == 0 and report["errors"] == {}
    assert report["total_output_tokens"] == 30 and report["total_input_tokens"] >= 6 * 8
    assert report["system_fingerprint"] and report["config"]["model"] == str(server_model(server))
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        s = report[key]
        assert 0 < s["median"] <= s["p99"] and s["mean"] > 0
    assert report["ttft_ms"]["median"] < report["e2e_ms"]["median"]
    assert report["request_throughput"] > 0 and report["output_token_throughput"] > 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_serve_counts_errors(server, tmp_path):
    out = tmp_path / "report.json"
    code = main(["--url", server.url, "--api-key", "wrong", "--model", "m", "--num-prompts", "2",
                 "--input-len", "4", "--output-len", "2", "--out", str(out)])
    report = json.loads(out.read_text())
    assert code == 1 and report["completed"] == 0 and report["errors"] == {"HTTP 401": 2}


def server_model(server) -> str:
    import httpx

    return httpx.get(server.url + "/v1/models", headers=server.headers).json()["data"][0]["id"]
