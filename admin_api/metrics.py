"""Prometheus metrics of one admin API app, in a registry of its own.

A registry per app (not the process-global default) lets several apps live in one process,
as they do in the tests. Under gunicorn each worker process exports its own figures.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

from ledger.commands import EntryResult

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ApiMetrics:
    """Request counts and latency by endpoint and status; ledger entry outcomes."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "tracechain_api_requests",
            "HTTP requests answered, by route template, method and status",
            ("endpoint", "method", "status"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "tracechain_api_request_duration_seconds",
            "Time to answer an HTTP request, by route template and method",
            ("endpoint", "method"),
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.entries_created = Counter(
            "tracechain_api_entries_created",
            "Ledger entries created through the API, by entry kind",
            ("kind",),
            registry=self.registry,
        )
        self.entries_existing = Counter(
            "tracechain_api_entries_existing",
            "Idempotent repeats answered with the entry booked earlier",
            registry=self.registry,
        )
        self.entries_rejected = Counter(
            "tracechain_api_entries_rejected",
            "Ledger entries the engine refused, by rejection code",
            ("code",),
            registry=self.registry,
        )

    def observe_request(self, endpoint: str, method: str, status: int, duration_s: float) -> None:
        self.requests.labels(endpoint, method, str(status)).inc()
        self.latency.labels(endpoint, method).observe(duration_s)

    def observe_results(self, kind: str, results: Iterable[EntryResult]) -> None:
        for result in results:
            if result.status == "created":
                self.entries_created.labels(kind).inc()
            elif result.status == "exists":
                self.entries_existing.inc()
            else:
                self.entries_rejected.labels(result.code or "unknown").inc()

    def render(self) -> bytes:
        """The registry in the Prometheus text exposition format."""
        return generate_latest(self.registry)
