"""The lifecycle states of a VM handle."""

from __future__ import annotations

import enum


class RunState(enum.Enum):
    """``CREATED → STARTING → RUNNING → STOPPING → STOPPED``; any state may end in ``FAILED``
    (QEMU refused to start or died on its own with an error)."""

    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"

    @property
    def is_final(self) -> bool:
        return self in (RunState.STOPPED, RunState.FAILED)
