"""Prometheus metrics of the API process (one registry per app, so tests can build several apps).

- ``ldd_http_request_duration_seconds{method, route, status}``: latency per route *template*
  (``/v1/jobs/{job_id}``, not one series per job id).
- ``ldd_jobs{state}``: jobs by state and ``ldd_queue_depth``: queued jobs, both read from the job store
  (the source of truth) when scraped.
- ``ldd_detect_batch_size``: images per ONNX Runtime call of the micro-batcher.
- ``ldd_detect_requests_total``, ``ldd_detect_errors_total``, ``ldd_detect_rejected_total`` (503: queue full;
  504: deadline), ``ldd_detect_queue_depth`` and ``ldd_detect_seconds`` (a latency histogram), each by
  ``deployment`` (empty when the model was named directly) and ``model``.
- ``ldd_storage_bytes{kind}``: bytes the datasets, checkpoints, runs and models take in the data folder, read
  when scraped (a deletion shows here).
- ``ldd_data_free_bytes``: free space in the data folder's file system, and ``ldd_data_min_free_bytes``, what
  writes must leave free (``LDD_MIN_FREE_BYTES``), both read when scraped.

The latency is recorded by ``api.middleware.LatencyMiddleware``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
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


class _StorageCollector(Collector):
    KINDS = ("datasets", "checkpoints", "runs", "models")

    def __init__(self, usage: Callable[[str], int]):
        self.usage = usage

    def collect(self) -> Iterator[GaugeMetricFamily]:
        used = GaugeMetricFamily("ldd_storage_bytes", "Bytes stored (data folder or object storage) by kind",
                                 labels=["kind"])  # fmt: skip
        for kind in self.KINDS:
            try:
                used.add_metric([kind], self.usage(kind))
            except Exception as e:  # object storage unreachable: the scrape still answers, without this family
                log.warning("metrics: cannot read the storage's usage: %s", e)
                return
        yield used


class Metrics:
    def __init__(
        self, job_counts: Callable[[], dict[str, int]], free_bytes: Callable[[], int] | None = None,
        min_free_bytes: int = 0, storage: Callable[[str], int] | None = None,
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
        labels = ["deployment", "model"]
        self.detect_requests = Counter("ldd_detect_requests", "Detect requests answered or refused", labels,
                                       registry=self.registry)  # fmt: skip
        self.detect_errors = Counter("ldd_detect_errors", "Detect requests that failed (4xx, 5xx)", labels,
                                     registry=self.registry)  # fmt: skip
        self.detect_rejected = Counter("ldd_detect_rejected", "Detect requests refused by backpressure",
                                       [*labels, "reason"], registry=self.registry)  # fmt: skip
        self.detect_queue = Gauge("ldd_detect_queue_depth", "Detect requests waiting or running", labels,
                                  registry=self.registry)  # fmt: skip
        self.detect_seconds = Histogram(
            "ldd_detect_seconds", "Detect latency of answered requests", labels, registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )  # fmt: skip
        self.registry.register(_StoreCollector(job_counts))
        if storage:
            self.registry.register(_StorageCollector(storage))
        if free_bytes is not None:
            self.registry.register(_DiskCollector(free_bytes, min_free_bytes))

    def render(self) -> bytes:
        return generate_latest(self.registry)
