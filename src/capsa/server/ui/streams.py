"""The long-lived connections the dashboard holds open (event streams, terminals), counted so that
``/ui/api/server`` shows them and the tests see a disconnected browser's streams go."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

MAX_STREAMS = 200  # open streams of all kinds at once: more is refused (429)


class Streams:
    def __init__(self, limit: int = MAX_STREAMS) -> None:
        self.limit = limit
        self._open: Counter[str] = Counter()

    @contextlib.contextmanager
    def track(self, kind: str) -> Iterator[None]:
        """Count one open stream of ``kind`` for the ``with`` block (check :meth:`full` first)."""
        self._open[kind] += 1
        try:
            yield
        finally:
            self._open[kind] -= 1
            if not self._open[kind]:
                del self._open[kind]

    def full(self) -> bool:
        return self.total() >= self.limit

    def total(self) -> int:
        return sum(self._open.values())

    def counts(self) -> dict[str, int]:
        return dict(self._open)
