"""Prometheus metrics of the API process (one registry per app, so tests can build several apps).

- ``ldd_http_request_duration_seconds{method, route, status}``: latency per route *template*
  (``/v1/jobs/{job_id}``, not one series per job id).
- ``ldd_jobs{state}``: jobs by state and ``ldd_queue_depth``: queued jobs, both read from the job store
  (the source of truth) when scraped.
- ``ldd_detect_batch_size``: images per ONNX Runtime call of the micro-batcher.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

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


def route_template(scope: Scope) -> str:
    """The matched route's path template (set in the scope by the router), or ``<unmatched>``.

    Templates keep the label cardinality bounded: one series per endpoint, not one per job id.
    """
    return getattr(scope.get("route"), "path", None) or "<unmatched>"


class LatencyMiddleware:
    """Pure ASGI middleware (it does not buffer streaming responses such as SSE)."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def _send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, _send)
        finally:
            route = route_template(scope)
            self.metrics.latency.labels(scope["method"], route, str(status)).observe(time.perf_counter() - start)
