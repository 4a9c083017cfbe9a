"""The lifecycle states of a VM handle: :class:`capsa.runstate.RunState`, re-exported here.

The enum lives at the bottom layer (``capsa.runstate``) because ``capsa.errors`` types
``VMStateError``'s fields with it; this module keeps the VM package's name for it.
"""

from __future__ import annotations

from capsa.runstate import RunState

__all__ = ["RunState"]
