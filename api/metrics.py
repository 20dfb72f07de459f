"""Prometheus metrics of the API process (one registry per app, so tests can build several apps).

- ``ldd_http_request_duration_seconds{method, route, status}``: latency per route *template*
  (``/v1/jobs/{job_id}``, not one series per job id).
- ``ldd_jobs{state}``: jobs by state and ``ldd_queue_depth``: queued jobs, both read from the job store
  (the source of truth) when scraped.
- ``ldd_detect_batch_size``: images per ONNX Runtime call of the micro-batcher.
- ``ldd_data_free_bytes``: free space in the data folder's file system, and ``ldd_data_min_free_bytes``, what
  writes must leave free (``LDD_MIN_FREE_BYTES``), both read when scraped.

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


class _DiskCollector(Collector):
    def __init__(self, free_bytes: Callable[[], int], min_free_bytes: int):
        self.free_bytes, self.min_free_bytes = free_bytes, min_free_bytes

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            free = self.free_bytes()
        except OSError as e:
            log.warning("metrics: cannot read the data folder's free space: %s", e)
            return
        yield GaugeMetricFamily("ldd_data_free_bytes", "Free bytes in the data folder's file system", value=free)
        yield GaugeMetricFamily("ldd_data_min_free_bytes", "Bytes writes must leave free (LDD_MIN_FREE_BYTES)",
                                value=self.min_free_bytes)  # fmt: skip


class Metrics:
    def __init__(
        self, job_counts: Callable[[], dict[str, int]], free_bytes: Callable[[], int] | None = None,
        min_free_bytes: int = 0,
    ):  # fmt: skip
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
        if free_bytes is not None:
            self.registry.register(_DiskCollector(free_bytes, min_free_bytes))

    def render(self) -> bytes:
        return generate_latest(self.registry)
