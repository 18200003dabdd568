"""Prometheus metrics, one CollectorRegistry per app (two apps in one process never mix counts).

Every series carries `model` and `version` (the weights version that served it), so a canary and
the stable version can be told apart by the router. Latencies are observed by the server as the
client sees them; engine-side counters (prefix cache) are synced from `LLMEngine.stats()` at
scrape time.

    name (prefix autoglm_)            kind       what
    time_to_first_token_seconds       histogram  arrival at the server -> first token out
    inter_token_latency_seconds       histogram  between consecutive tokens of one request
    e2e_request_latency_seconds       histogram  arrival -> last token
    request_queue_time_seconds        histogram  arrival -> first scheduled by the engine
    num_requests_running / _waiting   gauge      engine batch / admission queue + engine queue
    kv_cache_usage_ratio              gauge      used KV blocks / all KV blocks
    kv_free_blocks / kv_total_blocks  gauge      KV pool (free includes cached-but-unreferenced)
    prompt_tokens_total               counter    prompt tokens of accepted requests
    generation_tokens_total           counter    tokens generated (also for aborted requests)
    prefix_cache_queries_total / hits counter    prompt tokens looked up / found in the prefix cache
    request_success_total             counter    {finished_reason: stop | length}
    request_failure_total             counter    {reason: invalid_request | queue_full | ...}
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from open_autoglm.engine.request import RequestOutput

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
               0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0)
LABELS = ("model", "version")


class ServerMetrics:
    def __init__(self, model: str) -> None:
        self.model = model
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.ttft = Histogram("autoglm_time_to_first_token_seconds", "Time to first token", LABELS,
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("autoglm_inter_token_latency_seconds", "Time between consecutive tokens", LABELS,
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("autoglm_e2e_request_latency_seconds", "Request latency, arrival to last token",
                             LABELS, buckets=E2E_BUCKETS, registry=r)
        self.queue_time = Histogram("autoglm_request_queue_time_seconds", "Arrival to first scheduled",
                                    LABELS, buckets=E2E_BUCKETS, registry=r)
        self.running = Gauge("autoglm_num_requests_running", "Sequences in the engine batch", LABELS, registry=r)
        self.waiting = Gauge("autoglm_num_requests_waiting", "Sequences waiting (admission + engine queue)",
                             LABELS, registry=r)
        self.kv_usage = Gauge("autoglm_kv_cache_usage_ratio", "Used fraction of the KV cache", LABELS, registry=r)
        self.kv_free = Gauge("autoglm_kv_free_blocks", "Free KV blocks", LABELS, registry=r)
        self.kv_total = Gauge("autoglm_kv_total_blocks", "All KV blocks", LABELS, registry=r)
        self.prompt_tokens = Counter("autoglm_prompt_tokens", "Prompt tokens", LABELS, registry=r)
        self.generation_tokens = Counter("autoglm_generation_tokens", "Generated tokens", LABELS, registry=r)
        self.prefix_queries = Counter("autoglm_prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                      LABELS, registry=r)
        self.prefix_hits = Counter("autoglm_prefix_cache_hits", "Prompt tokens found in the prefix cache",
                                   LABELS, registry=r)
        self.success = Counter("autoglm_request_success", "Finished requests", LABELS + ("finished_reason",),
                               registry=r)
        self.failure = Counter("autoglm_request_failure", "Failed or refused requests", LABELS + ("reason",),
                               registry=r)
        self._last_engine: dict[str, int] = {}

    def fail(self, version: str, reason: str, count: int = 1) -> None:
        self.failure.labels(self.model, version, reason).inc(count)

    def sync_engine(self, version: str, stats: dict, num_queued: int) -> None:
        """Gauges from a stats snapshot; engine counters advance by their change since last scrape."""
        labels = (self.model, version)
        self.running.labels(*labels).set(stats["num_running"])
        self.waiting.labels(*labels).set(stats["num_waiting"] + num_queued)
        self.kv_usage.labels(*labels).set(stats["kv_cache_usage"])
        self.kv_free.labels(*labels).set(stats["num_free_blocks"])
        self.kv_total.labels(*labels).set(stats["num_blocks"])
        for key, counter in (("prefix_cache_queries", self.prefix_queries), ("prefix_cache_hits", self.prefix_hits)):
            value = int(stats.get(key, 0))
            delta = value - self._last_engine.get(key, 0)
            if delta < 0:  # the engine's count restarted (e.g. a new engine): count from there
                delta = value
            if delta:
                counter.labels(*labels).inc(delta)
            self._last_engine[key] = value

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """Observes one engine sequence's latencies as its outputs arrive at the server, and counts its
    tokens and outcome exactly once: when it finishes, or when the server gives up on it."""

    def __init__(self, metrics: ServerMetrics, arrival: float, num_prompt_tokens: int) -> None:
        self.metrics = metrics
        self.arrival = arrival
        self.num_prompt_tokens = num_prompt_tokens
        self.version = ""
        self.last: float | None = None
        self.num_tokens = 0
        self.done = False

    def observe(self, out: RequestOutput, now: float) -> None:
        m, labels = self.metrics, (self.metrics.model, out.version)
        self.version = out.version
        n = len(out.new_token_ids)
        if n:
            if self.last is None:
                m.ttft.labels(*labels).observe(now - self.arrival)
                if out.first_scheduled_time is not None:
                    m.queue_time.labels(*labels).observe(max(0.0, out.first_scheduled_time - self.arrival))
            else:
                hist, gap = m.itl.labels(*labels), (now - self.last) / n
                for _ in range(n):
                    hist.observe(gap)
            self.last = now
            self.num_tokens += n
        if out.finished:
            self.done = True
            self._count_tokens()
            if out.finish_reason in ("stop", "length"):
                m.e2e.labels(*labels).observe(now - self.arrival)
                m.success.labels(*labels, out.finish_reason).inc()
            else:
                m.fail(out.version, "aborted" if out.finish_reason == "abort" else "engine_error")

    def abandon(self, version: str, reason: str) -> None:
        """The server stopped listening before the sequence finished (client gone, error)."""
        if not self.done:
            self.done = True
            self.version = self.version or version
            self._count_tokens()
            self.metrics.fail(self.version, reason)

    def _count_tokens(self) -> None:
        labels = (self.metrics.model, self.version)
        self.metrics.prompt_tokens.labels(*labels).inc(self.num_prompt_tokens)
        self.metrics.generation_tokens.labels(*labels).inc(self.num_tokens)
