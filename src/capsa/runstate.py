"""The lifecycle states of a VM handle (below `capsa.errors`, which types `VMStateError` with them;
`capsa.vm.runstate`, `capsa.vm` and `capsa` re-export the enum)."""

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

    def can_become(self, new: RunState) -> bool:
        """Whether the lifecycle allows going from this state to ``new`` (final states are final)."""
        return new in _TRANSITIONS[self]


_TRANSITIONS: dict[RunState, frozenset[RunState]] = {
    RunState.CREATED: frozenset({RunState.STARTING, RunState.STOPPED}),
    RunState.STARTING: frozenset(
        {RunState.RUNNING, RunState.STOPPING, RunState.STOPPED, RunState.FAILED}
    ),
    RunState.RUNNING: frozenset({RunState.STOPPING, RunState.STOPPED, RunState.FAILED}),
    RunState.STOPPING: frozenset({RunState.STOPPED, RunState.FAILED}),
    RunState.STOPPED: frozenset(),
    RunState.FAILED: frozenset(),
}
