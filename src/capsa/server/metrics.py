"""Prometheus metrics for ``capsa serve`` (one registry per server, served at ``/metrics``)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self, running: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        self.sandboxes = Gauge(
            "capsa_server_sandboxes_running", "Sandboxes running now", registry=self.registry
        )
        self.sandboxes.set_function(running)
        self.creates = Counter(
            "capsa_server_sandbox_creates", "Sandboxes created", ["template"], registry=self.registry
        )
        self.create_seconds = Histogram(
            "capsa_server_sandbox_create_seconds",
            "Time to create a sandbox (pool take or build)",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.execs = Counter(
            "capsa_server_commands", "Commands started (process.Start)", registry=self.registry
        )
        self.code_runs = Counter(
            "capsa_server_code_executions", "Code interpreter executions", registry=self.registry
        )
        self.requests = Counter(
            "capsa_server_requests", "HTTP requests", ["status"], registry=self.registry
        )

    def created(self, seconds: float, template: str) -> None:
        self.creates.labels(template=template).inc()
        self.create_seconds.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
