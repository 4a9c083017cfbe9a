"""``capsa.ray``: sandboxes placed across a Ray cluster (``pip install 'capsa[ray]'``).

::

    import ray, capsa.ray as cray
    ray.init(address="auto")
    sbx = await cray.sandbox().memory_mb(512).network(net).build()   # capsa.sandbox()'s builder
    r = await sbx.agent.exec("python3").args(["-c", "print(1)"]).run()
    p = await sbx.agent.exec("sh").args(["-c", "..."]).spawn()
    async for chunk in p.stdout: ...                                  # streams across nodes
    await sbx.stop()

Nodes opt in with the custom resource ``capsa_slots: N``; each gets one host actor (started by the
first build, not detached: it dies with the driver, and its VMs with it). Each sandbox holds its
slot through Ray, so drivers sharing a node never exceed its slots; the node's owner decides which
host paths and ports remote callers may name (``_node_policy``). Placement picks the
least-loaded node with a free slot; ``.node(label="zone=b")`` or ``.node(node_id=...)`` constrains
it. The remote handle's API is derived from capsa's async classes (see ``_surface``); plain methods
of the local API (``network.log()``, ``set_lifetime``) are awaited here, since they cross processes.
See docs/scale-out.md. Ray is imported only when a sandbox is built.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Callable
from typing import Any

from capsa._context import BuildsOnEnter
from capsa.errors import ConfigError, SandboxLost
from capsa.ray._host import CONFIG_STEP, NoSlotError, Step
from capsa.ray._placement import Constraint, placer
from capsa.ray._remote import RaySandbox, Remote, RemoteBuilder
from capsa.ray._slots import SLOT_RESOURCE
from capsa.ray._surface import surface
from capsa.sandbox.builder import DEFAULT_BUILD_TIMEOUT, SandboxBuilder

DEFAULT_PLACEMENT_TIMEOUT = 30.0


class RaySandboxBuilder(BuildsOnEnter[RaySandbox]):
    """``capsa.sandbox()``'s builder, recorded here and replayed by the host actor that builds it.

    Every builder method of :class:`capsa.SandboxBuilder` is available (derived, not copied);
    values are checked when the actor replays them, so a bad one raises :class:`capsa.ConfigError`
    from ``build()``. Paths (kernel, shares, snapshots) are paths on the node that builds, inside
    the host root its owner allowed (``CAPSA_RAY_HOST_ROOT``; none by default: docs/scale-out.md)."""

    def __init__(
        self,
        steps: tuple[Step, ...] = (),
        constraint: Constraint | None = None,
        wait: float = DEFAULT_PLACEMENT_TIMEOUT,
    ) -> None:
        self._steps = steps
        self._constraint = constraint or Constraint()
        self._wait = wait

    def __getattr__(self, name: str) -> Callable[..., RaySandboxBuilder]:
        if name.startswith("_") or name not in surface("SandboxBuilder").chains:
            raise AttributeError(f"SandboxBuilder has no builder method {name!r}")

        def record(*args: Any, **kwargs: Any) -> RaySandboxBuilder:
            return RaySandboxBuilder((*self._steps, (name, args, kwargs)), self._constraint, self._wait)

        record.__name__ = name
        return record

    def node(self, *, label: str | None = None, node_id: str | None = None) -> RaySandboxBuilder:
        """Build only on a node with this label (``"key=value"``, or ``"key"`` for any value; see
        ``ray start --labels``) and/or this Ray node id (hex)."""
        for value in (label, node_id):
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(f"node() takes non-empty strings, got {value!r}")
        return RaySandboxBuilder(self._steps, Constraint(node_id, label), self._wait)

    def placement_timeout(self, seconds: float) -> RaySandboxBuilder:
        """How long ``build()`` waits for a free slot before :class:`NoSlotError` (default 30 s)."""
        number = isinstance(seconds, int | float) and not isinstance(seconds, bool)
        if not number or not math.isfinite(seconds) or seconds <= 0:
            raise ConfigError(f"placement_timeout takes a positive number of seconds, got {seconds!r}")
        return RaySandboxBuilder(self._steps, self._constraint, float(seconds))

    async def build(self, timeout: float = DEFAULT_BUILD_TIMEOUT) -> RaySandbox:
        """A running sandbox on the least-loaded node with a free slot (after waiting up to the
        placement timeout for one); ``timeout`` covers the build on that node."""
        host, ref = await placer().place(list(self._steps), self._constraint, self._wait, timeout)
        return RaySandbox(host, ref)


def sandbox() -> RaySandboxBuilder:
    """Start describing a sandbox to run on a Ray node (same builder as :func:`capsa.sandbox`)."""
    return RaySandboxBuilder()


def remote(builder: SandboxBuilder) -> RaySandboxBuilder:
    """A ``capsa.ray`` builder with the configuration of a local ``capsa.sandbox()`` builder, for
    code that already makes local builders (e.g. a server's templates): ``await
    cray.remote(local).build()`` builds the same sandbox on a Ray node. Further builder calls
    and ``node(...)`` may follow."""
    if not isinstance(builder, SandboxBuilder):
        raise ConfigError(f"remote() takes a capsa.SandboxBuilder, not {type(builder).__name__}")
    return RaySandboxBuilder(((CONFIG_STEP, (builder.config,), {}),))


async def warm(builder: RaySandboxBuilder, per_node: int) -> None:
    """Keep ``per_node`` sandboxes of ``builder``'s recipe booted on every node with capsa slots
    (nodes that join later too); builds of the same recipe then take one at once. The pool counts
    against each node's slots; ``per_node=0`` removes it."""
    if isinstance(per_node, bool) or not isinstance(per_node, int) or per_node < 0:
        raise ConfigError(f"per_node must be a non-negative integer, got {per_node!r}")
    place = placer()
    steps = list(builder._steps)
    key = repr(steps)
    if per_node:
        place.warm[key] = (steps, per_node)
    else:
        place.warm.pop(key, None)
    hosts = await place.refresh(force=True)
    await asyncio.gather(
        *(h.reply(h.actor.warm.remote(steps, per_node)) for h in hosts if constraint_ok(builder, h))
    )


def constraint_ok(builder: RaySandboxBuilder, host: Any) -> bool:
    return builder._constraint.matches(host)


async def nodes() -> list[dict[str, Any]]:
    """The nodes with capsa slots as this driver sees them: ``node_id``, ``used``, ``slots``,
    ``labels``, and the host actor's ``pid``."""
    place = placer()
    loads = await place.loads(await place.refresh(force=True))
    return [
        {"node_id": h.node_id, "used": used, "slots": slots, "labels": h.labels, "pid": h.pid}
        for h, used, slots in loads
    ]


async def vm_pids() -> dict[str, list[int]]:
    """The QEMU pids of every sandbox this driver's host actors own, warm-pool ones included, by
    ``node_id``: for leak checks and for waiting until a :func:`warm` pool has booted."""
    place = placer()
    hosts = await place.refresh(force=True)
    pids = await asyncio.gather(*(h.request(h.actor.vm_pids.remote(), 60.0) for h in hosts))
    return {h.node_id: list(p) for h, p in zip(hosts, pids, strict=True)}


async def shutdown() -> None:
    """Stop every sandbox and warm pool this driver placed, and end its host actors. (They also
    end, with their VMs, when the driver exits.)"""
    import ray  # noqa: PLC0415

    place = placer()
    hosts = list(place.hosts.values())
    place.hosts.clear()
    place.warm.clear()
    for host in hosts:
        with contextlib.suppress(SandboxLost, TimeoutError):
            await host.request(host.actor.close.remote(), 60.0)
        ray.kill(host.actor, no_restart=True)


__all__ = [
    "SLOT_RESOURCE",
    "NoSlotError",
    "RaySandbox",
    "RaySandboxBuilder",
    "Remote",
    "RemoteBuilder",
    "SandboxLost",
    "nodes",
    "remote",
    "sandbox",
    "shutdown",
    "vm_pids",
    "warm",
]
