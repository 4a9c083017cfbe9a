"""What the pages show of a sandbox, as JSON: one row of the live list (with a short CPU and
memory history for its sparklines) and the egress denials counted from its network log."""

from __future__ import annotations

import inspect
import time
from typing import Any

from capsa.errors import CapsaError
from capsa.server.entry import Entry
from capsa.server.guest_metrics import Sampler

SPARK_POINTS = 30  # samples in a row's sparklines


class Denials:
    """Each sandbox's egress denials so far, counted incrementally from its network log (the
    network stack's newest decisions) so that a refresh reads only the new ones, and at most once
    per ``fresh_for`` seconds however many pages ask."""

    def __init__(self, fresh_for: float = 0.4) -> None:
        self._seen: dict[str, tuple[Any, int]] = {}  # sandbox id -> (newest decision, denials)
        self._counted: dict[str, float] = {}  # sandbox id -> when (monotonic) it was last read
        self._fresh_for = fresh_for

    async def count(self, entry: Entry) -> int | None:
        """The sandbox's denials (None: it has no network interface, or is paused)."""
        if entry.policy is None:
            return None
        recent = time.monotonic() - self._counted.get(entry.id, -1e9) < self._fresh_for
        if not entry.running or recent:  # paused: its count when it paused
            return self._seen.get(entry.id, (None, 0))[1]
        self._counted[entry.id] = time.monotonic()
        decisions = await log_of(entry)
        last, denied = self._seen.get(entry.id, (None, 0))
        fresh = 0
        for decision in reversed(decisions):
            if decision == last:
                break
            fresh += decision.action == "deny"
        else:
            if last is not None:  # the last one seen has left the log's window: count afresh
                fresh = sum(d.action == "deny" for d in decisions)
                denied = 0
        if decisions:
            self._seen[entry.id] = (decisions[-1], denied + fresh)
        return denied + fresh

    def forget(self, keep: set[str]) -> None:
        for gone in set(self._seen) - keep:
            del self._seen[gone]
        for gone in set(self._counted) - keep:
            del self._counted[gone]


async def log_of(entry: Entry) -> list[Any]:
    """The sandbox's network decisions, oldest first (empty if it has no network or is paused)."""
    if entry.policy is None or not entry.running:
        return []
    try:
        decisions: Any = entry.vm.network.log()
        if inspect.isawaitable(decisions):  # a sandbox on a Ray node
            decisions = await decisions
    except CapsaError:
        return []
    return list(decisions)


def row(entry: Entry, sampler: Sampler, denials: int | None) -> dict[str, Any]:
    """One sandbox of the live list. Times are unix seconds: the page counts age and time left."""
    samples = sampler.series(entry.id)[-SPARK_POINTS:]
    latest = samples[-1] if samples else None
    return {
        "id": entry.id,
        "template": entry.template,
        "state": entry.state,
        "tenant": entry.tenant,
        "started": entry.started_at.timestamp(),
        "end": entry.end_at.timestamp(),
        "metadata": entry.metadata,
        "denials": denials,
        "cpu": None if latest is None else round(latest.cpu_used_pct, 1),
        "mem": None if latest is None else latest.mem_used,
        "memTotal": None if latest is None else latest.mem_total,
        "cpuHistory": [round(s.cpu_used_pct, 1) for s in samples],
        "memHistory": [s.mem_used for s in samples],
    }


def decision_json(decision: Any) -> dict[str, Any]:
    return {
        "time": decision.time,
        "proto": decision.proto,
        "dst": decision.dst_ip,
        "port": decision.dst_port,
        "domain": decision.domain,
        "rule": decision.rule,
        "action": decision.action,
    }
