"""What the dashboard's routes need from the server, in one object built by :mod:`.app`. It holds
the server's parts (not the server) so that this package does not import :mod:`capsa.server.app`,
which mounts it."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from capsa.server.guest_metrics import Sampler
from capsa.server.limits import Limits
from capsa.server.metrics import Metrics
from capsa.server.registry import Registry
from capsa.server.tenants import KeyRing
from capsa.server.ui.session import Sessions
from capsa.server.ui.streams import Streams

if TYPE_CHECKING:
    from capsa.server.durable import Journal


@dataclass
class UiDeps:
    registry: Registry
    sessions: Sessions
    sampler: Sampler  # the guest metrics (CPU, memory) per sandbox
    metrics: Metrics  # the server's Prometheus series (denials, ends)
    limits: Limits
    keys: KeyRing
    pools: dict[str, int]  # the configured pool sizes per template (--pool)
    journal: Journal | None = None  # recent sandbox ends (None without --state-dir)
    domain: str = "localhost:3000"
    ready: Callable[[], bool] = lambda: True  # the server is serving (its /health)
    started: float = field(default_factory=time.time)  # when the server started (unix seconds)
    streams: Streams = field(default_factory=Streams)  # open event streams and terminals
