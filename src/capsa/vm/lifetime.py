"""A VM's lifetime, the one model of it: how long it was given, when it ends, and why later calls fail.

The builders (:meth:`capsa.VMBuilder.lifetime`, :meth:`capsa.SandboxBuilder.lifetime`) keep only the
number of seconds (checked by :func:`capsa.vm.config.validate_lifetime`); from ``build()`` on, the
VM's :class:`Lifetime` holds the rest. The VM arms it (``set_lifetime``, a builder's lifetime, a
fork's inherited deadline) and decides what its end does (kill and clean up).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from capsa.errors import VMNotRunning
from capsa.vm.config import format_seconds

__all__ = ["Lifetime"]


class Lifetime:
    """The deadline of one VM on its event loop."""

    def __init__(self) -> None:
        self.label: float | None = None  # seconds, as last set (for messages)
        self.deadline: float | None = None  # loop time when the lifetime ends
        self.expired: VMNotRunning | None = None  # set once the lifetime has run out
        self._timer: asyncio.TimerHandle | None = None

    def remaining(self, loop: asyncio.AbstractEventLoop | None) -> float | None:
        """Seconds until the lifetime ends (``0.0`` once it has); ``None`` without a lifetime."""
        if self.expired is not None:
            return 0.0
        if self.deadline is None or loop is None:
            return None
        return max(0.0, self.deadline - loop.time())

    def arm(
        self, loop: asyncio.AbstractEventLoop, remaining: float, label: float, on_end: Callable[[], None]
    ) -> None:
        """End the lifetime ``remaining`` seconds from now (replacing any earlier deadline) by calling
        ``on_end``; messages call it a lifetime of ``label`` seconds."""
        self.cancel()
        self.label = label
        self.deadline = loop.time() + remaining
        self._timer = loop.call_at(self.deadline, self._fire, on_end)

    def _fire(self, on_end: Callable[[], None]) -> None:
        self._timer = None
        on_end()

    def cancel(self) -> None:
        """Disarm the timer (the VM is being cleaned up); the deadline is kept for messages."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def expire(self, kind: str) -> VMNotRunning:
        """Record that the lifetime ran out; returns the error every later call raises."""
        assert self.label is not None
        self.expired = VMNotRunning(
            f"the {kind}'s lifetime of {format_seconds(self.label)} expired: it was stopped and removed",
            hint="give it a longer lifetime, or extend it while it runs with set_lifetime(seconds)",
        )
        return self.expired

    def check(self) -> None:
        """Raise the expiry error if the lifetime ran out (for calls that need a running VM)."""
        if self.expired is not None:
            raise self.expired
