"""The dashboard's row data without a VM: the process listing parsed from the guest's /proc, and
the egress denials counted incrementally from a network log."""

from __future__ import annotations

import asyncio
import datetime
from dataclasses import dataclass, field
from typing import Any

from capsa.net.stack import LogEntry
from capsa.server.ui.info import parse_ps
from capsa.server.ui.views import Denials

STAT = "{pid} (bash) S 1 {pid} {pid} 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 {start} 10000 {rss} 0"


def test_parse_ps() -> None:
    text = "\n".join(
        [
            "100.50 77",
            "1\troot\t" + STAT.format(pid=1, start=50, rss=3000) + "\t/usr/bin/python3 agent ",
            "42\tuser\t" + STAT.format(pid=42, start=9000, rss=200) + "\tsleep 60 ",
            "77\troot\t" + STAT.format(pid=77, start=10040, rss=10) + "\tsh -c listing",
            "78\troot\t"
            + STAT.format(pid=78, start=10040, rss=10).replace(" S 1 ", " R 77 ")
            + "\tsh -c x",
            "garbage line",
            "43\tuser\t43 (odd) name) S 1",  # too short: skipped
        ]
    )
    rows = parse_ps(text)
    assert [r["pid"] for r in rows] == [1, 42]  # the listing (77) and its subshell (78) left out
    assert rows[0]["command"] == "/usr/bin/python3 agent" and rows[0]["user"] == "root"
    assert rows[0]["rss"] == 3000 * 4096
    assert abs(rows[0]["seconds"] - 100.0) < 1e-6
    assert abs(rows[1]["seconds"] - 10.5) < 1e-6
    assert parse_ps("") == [] and parse_ps("not a number") == []


class Network:
    def __init__(self) -> None:
        self.entries: list[LogEntry] = []
        self.reads = 0

    def log(self) -> list[LogEntry]:
        self.reads += 1
        return list(self.entries)


@dataclass
class Vm:
    network: Network = field(default_factory=Network)


@dataclass
class FakeEntry:
    """The fields Denials reads of a server Entry (a real Entry needs a VM)."""

    id: str = "i1"
    policy: Any = "a policy"
    running: bool = True
    vm: Vm = field(default_factory=Vm)
    started_at: datetime.datetime = field(default_factory=lambda: datetime.datetime.now(datetime.UTC))


def decision(n: int, action: str) -> LogEntry:
    return LogEntry(float(n), "tcp", "10.0.0.1", 80, None, "rule", action)


def test_denials_are_counted_incrementally() -> None:
    denials = Denials(fresh_for=0)
    entry = FakeEntry()
    count: Any = lambda: asyncio.run(denials.count(entry))  # noqa: E731
    assert count() == 0
    entry.vm.network.entries += [decision(1, "deny"), decision(2, "allow"), decision(3, "deny")]
    assert count() == 2
    entry.vm.network.entries += [decision(4, "deny")]
    assert count() == 3
    assert count() == 3
    entry.vm.network.entries = [decision(n, "deny") for n in range(10, 15)]  # the window moved on
    assert count() == 5
    entry.running = False
    assert count() == 5  # paused: its last count
    assert asyncio.run(denials.count(FakeEntry(policy=None))) is None  # type: ignore[arg-type]


def test_denials_read_a_log_once_however_many_pages_ask() -> None:
    denials = Denials(fresh_for=60)
    entry = FakeEntry()
    for _ in range(5):
        asyncio.run(denials.count(entry))  # type: ignore[arg-type]
    assert entry.vm.network.reads == 1
    denials.forget(set())
    asyncio.run(denials.count(entry))  # type: ignore[arg-type]
    assert entry.vm.network.reads == 2
