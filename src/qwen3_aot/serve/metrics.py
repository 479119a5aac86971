"""/metrics: Prometheus text, in one registry per server (not prometheus_client's global one,
so that two apps in one process do not collide). Names follow vLLM's with our prefix.

The engine's own figures (running, waiting, blocks, preemptions, token counts, prefix-cache
queries and hits) are read from `engine.stats()` at each scrape; latencies are observed by the
server as pieces go out."""

from __future__ import annotations

from typing import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from qwen3_aot.runtime.service.engine import Engine

PREFIX = "qwen3_aot_"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# seconds; vLLM's buckets, which span a CPU test model to a long GPU queue
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.2, 0.3, 0.4, 0.5,
               0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0, 120.0, 240.0, 480.0)


class _EngineCollector(Collector):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator:
        s = self.engine.stats()
        gauges = {"num_requests_running": ("Requests in the running batch.", s.num_running),
                  "num_requests_waiting": ("Requests waiting to be scheduled.", s.num_waiting),
                  "kv_cache_num_blocks": ("KV-cache blocks in all.", s.num_blocks),
                  "kv_cache_free_blocks": ("KV-cache blocks free.", s.num_free_blocks),
                  "kv_cache_usage_perc": ("Fraction of the KV-cache blocks in use (1 = full).",
                                          1 - s.num_free_blocks / s.num_blocks if s.num_blocks else 0.0)}
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(PREFIX + name, doc, value=value)
        yield GaugeMetricFamily(PREFIX + "prefix_cache_blocks", "KV-cache blocks findable by their content.",
                                value=s.num_cached_blocks)
        counters = {"num_preemptions": ("Sequences preempted (their blocks taken back) so far.", s.num_preemptions),
                    "prefix_cache_queries": ("Tokens of joining sequences looked up in the prefix cache.",
                                             s.prefix_cache_queries),
                    "prefix_cache_hits": ("Of those, tokens found in the prefix cache.", s.prefix_cache_hits),
                    "prompt_tokens": ("Prompt tokens prefilled so far.", s.prompt_tokens),
                    "generation_tokens": ("Tokens generated so far.", s.generation_tokens)}
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(PREFIX + name, doc, value=value)


class Metrics:
    def __init__(self, engine: Engine) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine))
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "From a request's arrival to its first token.",
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Between two tokens of one request.",
                             buckets=ITL_BUCKETS, registry=self.registry)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "From a request's arrival to its last token.",
                             buckets=E2E_BUCKETS, registry=self.registry)
        self.requests = Counter(PREFIX + "http_requests", "HTTP requests answered, by endpoint and status.",
                                ["endpoint", "status"], registry=self.registry)
        self.finished = Counter(PREFIX + "request_success", "Generations finished, by finish reason.",
                                ["finished_reason"], registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
