"""Prometheus metrics of the API process (one registry per app, so tests can build several apps).

- ``ldd_http_request_duration_seconds{method, route, status}``: latency per route *template*
  (``/v1/jobs/{job_id}``, not one series per job id).
- ``ldd_jobs{state}``: jobs by state and ``ldd_queue_depth``: queued jobs, both read from the job store
  (the source of truth) when scraped.
- ``ldd_detect_batch_size``: images per ONNX Runtime call of the micro-batcher.

The latency is recorded by ``api.middleware.LatencyMiddleware``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger("ldd.api")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _StoreCollector(Collector):
    def __init__(self, counts: Callable[[], dict[str, int]]):
        self.counts = counts

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            counts = self.counts()
        except Exception as e:  # a scrape must not fail because the store is down; readyz reports that
            log.warning("metrics: job store unavailable: %s", e)
            return
        jobs = GaugeMetricFamily("ldd_jobs", "Jobs in the store by state", labels=["state"])
        for state, n in sorted(counts.items()):
            jobs.add_metric([state], n)
        yield jobs
        yield GaugeMetricFamily("ldd_queue_depth", "Jobs waiting for a worker", value=counts.get("queued", 0))


class Metrics:
    def __init__(self, job_counts: Callable[[], dict[str, int]]):
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "ldd_http_request_duration_seconds",
            "HTTP request latency by route template",
            ["method", "route", "status"],
            registry=self.registry,
            buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.batch_size = Histogram(
            "ldd_detect_batch_size",
            "Images per ONNX Runtime call (detect micro-batches)",
            registry=self.registry,
            buckets=(1, 2, 4, 8, 16, 32, 64),
        )
        self.registry.register(_StoreCollector(job_counts))

    def render(self) -> bytes:
        return generate_latest(self.registry)
