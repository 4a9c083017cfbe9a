"""``capsa serve --ray ADDRESS``: the registry's sandboxes placed on a Ray cluster.

The seam is small because :class:`capsa.ray.RaySandbox` exposes the API of :class:`capsa.Sandbox`
(derived from it, see ``capsa.ray._surface``): the server's envd, files, watch and interpreter code
drive a remote handle as they drive a local sandbox. What differs is here: connecting the driver,
building through the host actors (``cray.remote(builder).build()``), warm pools per node
(``cray.warm``), telling whether a remote sandbox still runs (its node may have ended it: lifetime,
a guest crash; or it died with its node or host actor: ``node_lost``), and ending the host actors
on close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import capsa
from capsa.errors import CapsaError, ConfigError, SandboxLost
from capsa.vm import RunState

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 120.0
_ALL_STATES = tuple(RunState)


def connect_driver(address: str) -> None:
    """Connect this process to the Ray cluster at ``address`` as a driver (blocking; call it in
    the main thread before the server's event loop starts: ``ray.init`` sets a SIGTERM handler
    that the ASGI server then replaces with its own graceful shutdown)."""
    try:
        import ray  # noqa: PLC0415 (the ray extra is optional)
    except ImportError:
        raise ConfigError(
            "capsa serve --ray needs the ray extra (ray is not installed)",
            hint="pip install 'capsa[ray]'",
        ) from None
    if ray.is_initialized():
        return
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConfigError(
            f"cannot connect to the Ray cluster at {address!r}: {exc}",
            hint="pass the address `ray start --head` printed (HOST:6379), or 'auto' on a node",
        ) from None
    log.info("connected to the Ray cluster at %s", address)


async def connect(address: str) -> None:
    """Connect (if the command line has not already) and start a host actor on each node with
    capsa slots, so that a missing or slot-less cluster shows at start, not at the first create."""
    import capsa.ray as cray  # noqa: PLC0415

    connect_driver(address)
    async with asyncio.timeout(CONNECT_TIMEOUT):
        nodes = await cray.nodes()
    if not nodes:
        log.warning(
            "the Ray cluster at %s has no node with capsa_slots yet: creates wait for one", address
        )
    for node in nodes:
        log.info("Ray node %s: %d capsa slots", node["node_id"][:12], node["slots"])


async def warm(builder: capsa.SandboxBuilder, per_node: int) -> None:
    """``--pool TEMPLATE=N`` with ``--ray``: N sandboxes of the template kept booted on every node
    (nodes that join later too)."""
    import capsa.ray as cray  # noqa: PLC0415

    await cray.warm(cray.remote(builder), per_node=per_node)


async def build(builder: capsa.SandboxBuilder) -> capsa.Sandbox:
    """A sandbox of ``builder``'s recipe on the least-loaded node with a free slot (taken from
    that node's warm pool of the same recipe when there is one)."""
    import capsa.ray as cray  # noqa: PLC0415

    try:
        vm = await cray.remote(builder).build()
    except cray.NoSlotError as exc:
        from capsa.server.entry import ApiError  # noqa: PLC0415 (a cycle at import time)

        raise ApiError(503, f"no Ray node has a free capsa slot: {exc.message}", hint=exc.hint) from None
    # Typed as the local class: the server uses only the API the remote handle derives from it.
    return cast(capsa.Sandbox, vm)


async def _ended(vm: Any, timeout: float) -> Ended | None:
    try:
        await vm.wait_for_state(*_ALL_STATES, timeout=timeout)  # refreshes ``vm.status``
    except TimeoutError:
        return None  # a slow node is not a dead one
    except SandboxLost as exc:  # its node, or the host actor that ran it, died: so did its VM
        log.info("sandbox on node %s lost: %s", str(getattr(vm, "node_id", "?"))[:12], exc.message)
        return Ended(lost=exc.message)
    except CapsaError as exc:  # ended on its node (VMNotRunning)
        log.info("sandbox on node %s ended: %s", str(getattr(vm, "node_id", "?"))[:12], exc.message)
        return Ended()
    return Ended() if vm.status.is_final else None


@dataclass(frozen=True)
class Ended:
    """A remote sandbox that no longer runs; ``lost`` (why, when its node or host actor died:
    the end reason ``node_lost``) or empty (it ended on its node: lifetime, guest crash)."""

    lost: str = ""


async def probe(vms: Sequence[Any], timeout: float = 10.0) -> dict[int, Ended]:
    """Ask the nodes about their sandboxes (one cheap call each, concurrently): by ``id()``,
    those that ended there (lifetime, crash) or with their node."""
    found = await asyncio.gather(*(_ended(vm, timeout) for vm in vms), return_exceptions=True)
    return {id(vm): end for vm, end in zip(vms, found, strict=True) if isinstance(end, Ended)}


async def close() -> None:
    """Stop the warm pools and end this server's host actors (their VMs die with them)."""
    import capsa.ray as cray  # noqa: PLC0415

    with contextlib.suppress(Exception):
        await cray.shutdown()
