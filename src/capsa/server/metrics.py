"""Prometheus metrics for ``capsa serve`` (one registry per server, served at ``/metrics`` to any
API key; the series labelled with a sandbox id only to its tenant and admin keys)."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric

from capsa.errors import CapsaError

if TYPE_CHECKING:
    from capsa.server.entry import Entry
    from capsa.server.guest_metrics import Sample

# the per-sandbox gauges of the guest's samples: (metric name, Sample field, help)
_GUEST_GAUGES = (
    ("capsa_server_sandbox_cpu_count", "cpu_count", "CPUs the sandbox's guest sees"),
    ("capsa_server_sandbox_cpu_used_percent", "cpu_used_pct", "Guest CPU use since the last sample"),
    ("capsa_server_sandbox_memory_total_bytes", "mem_total", "Guest memory"),
    ("capsa_server_sandbox_memory_used_bytes", "mem_used", "Guest memory not available"),
    ("capsa_server_sandbox_memory_cache_bytes", "mem_cache", "Guest page cache"),
    ("capsa_server_sandbox_disk_total_bytes", "disk_total", "Guest root filesystem size"),
    ("capsa_server_sandbox_disk_used_bytes", "disk_used", "Guest root filesystem used"),
)


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
        self.ends = Counter(
            "capsa_server_sandbox_ends",
            "Sandboxes ended, by reason (killed, timeout, paused_then_killed, guest_crashed, "
            "host_error, server_shutdown, server_crashed, node_lost)",
            ["reason"],
            registry=self.registry,
        )
        self.requests = Counter(
            "capsa_server_requests", "HTTP requests", ["status"], registry=self.registry
        )

        self.egress_denials = Counter(
            "capsa_server_egress_denials",
            "Egress flows and DNS lookups denied by a sandbox's network policy",
            ["proto"],
            registry=self.registry,
        )
        self.sandbox_denials = Counter(
            "capsa_server_sandbox_egress_denials",
            "Egress denials per sandbox (the series goes when its sandbox is removed)",
            ["sandbox"],
            registry=self.registry,
        )

        self.guest = {
            attr: Gauge(
                name,
                f"{text} (latest sample; the series goes with its sandbox)",
                ["sandbox"],
                registry=self.registry,
            )
            for name, attr, text in _GUEST_GAUGES
        }

    def sampled(self, sandbox_id: str, sample: Sample | None) -> None:
        """Set ``sandbox_id``'s gauges to ``sample``; None drops them (the sandbox is gone)."""
        for attr, gauge in self.guest.items():
            if sample is None:
                with contextlib.suppress(KeyError):
                    gauge.remove(sandbox_id)
            else:
                gauge.labels(sandbox=sandbox_id).set(getattr(sample, attr))

    async def count_denials(self, entry: Entry) -> None:
        """Count the denials in ``entry``'s network log since the last count. The log is the
        network stack's (``vm.network.log()``, its newest 10 000 decisions); counted when
        ``/metrics`` is scraped, when a sandbox is paused and when it is removed."""
        if entry.policy is None:
            return  # no network interface
        try:
            decisions = entry.vm.network.log()
            if inspect.isawaitable(decisions):  # a sandbox on a Ray node (capsa serve --ray)
                decisions = await decisions
        except CapsaError:
            return
        seen = entry.extra.get("denials_seen")
        fresh = []
        for decision in reversed(decisions):
            if decision == seen:  # a remote sandbox's log comes as copies: compare values
                break
            fresh.append(decision)
        if decisions:
            entry.extra["denials_seen"] = decisions[-1]
        denied = [d for d in fresh if d.action == "deny"]
        for decision in denied:
            self.egress_denials.labels(proto=decision.proto).inc()
        if denied:
            self.sandbox_denials.labels(sandbox=entry.id).inc(len(denied))

    async def removed(self, entry: Entry) -> None:
        """Called as a sandbox is removed (its VM still there): count, then drop its series."""
        await self.count_denials(entry)
        with contextlib.suppress(KeyError):
            self.sandbox_denials.remove(entry.id)
        self.sampled(entry.id, None)

    async def collect(
        self, entries: Iterable[Entry], keep_sandbox: Callable[[str], bool] | None = None
    ) -> bytes:
        """The exposition text, after counting the running sandboxes' new denials; with
        ``keep_sandbox``, only the per-sandbox samples of the sandbox ids it accepts."""
        for entry in entries:
            await self.count_denials(entry)
        return self.render(keep_sandbox)

    def created(self, seconds: float, template: str) -> None:
        self.creates.labels(template=template).inc()
        self.create_seconds.observe(seconds)

    def render(self, keep_sandbox: Callable[[str], bool] | None = None) -> bytes:
        if keep_sandbox is None:
            return generate_latest(self.registry)
        return generate_latest(_SandboxFilter(self.registry, keep_sandbox))


class _SandboxFilter:
    """A view of a registry (what ``generate_latest`` reads: ``collect()``) without the samples
    labelled with a sandbox id ``keep`` refuses."""

    def __init__(self, registry: CollectorRegistry, keep: Callable[[str], bool]) -> None:
        self._registry = registry
        self._keep = keep

    def collect(self) -> Iterator[Metric]:
        for family in self._registry.collect():
            if not any("sandbox" in sample.labels for sample in family.samples):
                yield family
                continue
            kept = Metric(family.name, family.documentation, family.type, family.unit)
            kept.samples = [
                s for s in family.samples if "sandbox" not in s.labels or self._keep(s.labels["sandbox"])
            ]
            yield kept
