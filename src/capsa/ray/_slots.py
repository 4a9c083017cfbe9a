"""Slots held through Ray's own resource accounting, so that drivers that know nothing of each other
cannot fill a node twice.

Each driver starts its own host actors, whose counts of live sandboxes say nothing of the others'.
So every sandbox (and every warm-pool member) also holds ``capsa_slots: 1`` of its node for its
life: a Ray placement group of one bundle per slot, pinned to the node by its ``ray.io/node-id``
label. Ray grants a node's ``capsa_slots`` once, whoever asks; a reservation that Ray cannot grant
within the wait is withdrawn and the build answers "no slot here". A placement group needs no
process (unlike an actor or a task holding the resource).

Placement groups outlive the actor that made them (they belong to the driver's job): the actor
releases each with its sandbox, and a driver that replaces a dead actor removes the groups it left
(:func:`release_orphans`, by the actor id in their names). All end with the driver's job.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from typing import Any

log = logging.getLogger(__name__)

SLOT_RESOURCE = "capsa_slots"
NODE_LABEL = "ray.io/node-id"
PREFIX = "capsa-slots"
_serial = itertools.count(1)


class Reservation:
    """``count`` of a node's ``capsa_slots``, held until :meth:`release`."""

    def __init__(self, group: Any, count: int) -> None:
        self._group = group
        self.count = count

    def release(self) -> None:
        group, self._group = self._group, None
        if group is None:
            return
        from ray.util.placement_group import remove_placement_group  # noqa: PLC0415

        try:
            remove_placement_group(group)
        except Exception:
            log.warning("capsa.ray: releasing %d slot(s) failed", self.count, exc_info=True)


def _name(actor_id: str) -> str:
    return f"{PREFIX}:{actor_id}:{next(_serial)}"


async def reserve(count: int, wait: float) -> Reservation | None:
    """``count`` slots of this process's node, or None when Ray cannot grant them within ``wait``
    seconds (every slot is held, by this driver or another)."""
    from ray.util.placement_group import placement_group, remove_placement_group  # noqa: PLC0415

    import ray  # noqa: PLC0415 - Ray is optional for capsa

    context = ray.get_runtime_context()
    node_id = context.get_node_id()
    group = placement_group(
        [{SLOT_RESOURCE: 1}] * count,
        strategy="STRICT_PACK",
        name=_name(context.get_actor_id() or "driver"),
        bundle_label_selector=[{NODE_LABEL: node_id}] * count,
    )
    try:
        await asyncio.wait_for(asyncio.wrap_future(group.ready().future()), wait)
    except TimeoutError:
        with contextlib.suppress(Exception):
            remove_placement_group(group)
        return None
    except BaseException:
        with contextlib.suppress(Exception):
            remove_placement_group(group)
        raise
    return Reservation(group, count)


def release_orphans(actor_id: str) -> int:
    """Remove the reservations a dead host actor left (blocking: call it in a thread); how many."""
    from ray.util.placement_group import (  # noqa: PLC0415
        PlacementGroup,
        placement_group_table,
        remove_placement_group,
    )

    import ray  # noqa: PLC0415

    prefix = f"{PREFIX}:{actor_id}:"
    removed = 0
    for group_id, info in placement_group_table().items():
        if str(info.get("name", "")).startswith(prefix) and info.get("state") != "REMOVED":
            with contextlib.suppress(Exception):
                remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(group_id)))
                removed += 1
    return removed
