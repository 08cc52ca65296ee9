"""Prometheus metrics of the web process, in a registry of its own (no globals)."""

from __future__ import annotations

import time
from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class WebMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "sally_http_requests_total", "HTTP requests by route and status.", ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "sally_http_request_seconds", "HTTP request latency by route.", ["method", "route"],
            registry=self.registry, buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


class PipelineCollector:
    """Worker counters and queue depths, read from Redis at scrape time (workers run elsewhere)."""

    def __init__(self, read: Callable[[], dict[str, Any]]) -> None:
        self.read = read

    def collect(self):
        try:
            snapshot = self.read()
        except Exception:  # noqa: BLE001 - a scrape must not fail because Redis is down
            return
        jobs = CounterMetricFamily("sally_jobs", "Pipeline jobs by actor and outcome.", labels=["actor", "outcome"])
        for (actor, outcome), value in sorted(snapshot["jobs"].items()):
            jobs.add_metric([actor, outcome], value)
        yield jobs
        stripe = CounterMetricFamily("sally_stripe_calls", "Stripe purchase calls by outcome.", labels=["outcome"])
        for outcome, value in sorted(snapshot["stripe"].items()):
            stripe.add_metric([outcome], value)
        yield stripe
        depth = GaugeMetricFamily("sally_queue_depth", "Messages waiting per queue.", labels=["queue"])
        for queue, value in sorted(snapshot["queues"].items()):
            depth.add_metric([queue], value)
        yield depth
        delayed = GaugeMetricFamily(
            "sally_queue_delayed", "Messages waiting out a delay or a retry backoff per queue (Dramatiq's .DQ).",
            labels=["queue"],
        )
        for queue, value in sorted(snapshot.get("delayed", {}).items()):
            delayed.add_metric([queue], value)
        yield delayed
        dead = GaugeMetricFamily(
            "sally_queue_dead_letters",
            "Jobs given up after their last retry per queue (Dramatiq's .XQ); see `sally-scim jobs failed`.",
            labels=["queue"],
        )
        for queue, value in sorted(snapshot.get("dead", {}).items()):
            dead.add_metric([queue], value)
        yield dead


class MetricsMiddleware:
    """Counts requests by route template (never by raw path: ids would explode the labels)."""

    def __init__(self, app: ASGIApp, metrics: WebMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route: Any = scope.get("route")
            label = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.requests.labels(method, label, str(status["code"])).inc()
            self.metrics.latency.labels(method, label).observe(time.perf_counter() - started)
