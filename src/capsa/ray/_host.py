"""The host actor: one per Ray node that opted in (``capsa_slots: N``); it owns that node's VMs.

It is an async actor: every sandbox, agent call, pool and network stack of the node runs on the
actor's event loop with capsa's ordinary async API. Callers reach the objects through a table of
ids (:meth:`HostActor.call` forwards a method by name, checked against the surface derived in
``_surface``). Arguments that name the node's files or ports are checked here, in the actor, against
the node owner's policy (``_node_policy``), since any driver can call these methods directly; and
each sandbox holds its slot through Ray's resource accounting (``_slots``). The QEMU processes are
children of the actor's process with ``PR_SET_PDEATHSIG``, so they die with it however it ends
(driver exit, ``ray.kill``, ``kill -9``, node loss).

This module imports Ray only inside methods that need it, so it can be imported (and unit-tested)
without Ray; ``_placement`` wraps the class with ``ray.remote``.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import os
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import Any

from capsa import runtime
from capsa.errors import CapsaError, ConfigError, NoSlotError, VMNotRunning
from capsa.ray._node_policy import NodePolicy
from capsa.ray._slots import Reservation, reserve
from capsa.ray._surface import BUILDERS, ENDING_CALLS, is_plain, proxied_name, surface
from capsa.ray._wire import EncodedError, Failure, Ref, encode_error
from capsa.sandbox.builder import DEFAULT_BUILD_TIMEOUT, SandboxBuilder
from capsa.sandbox.handle import Sandbox
from capsa.sandbox.pool import Pool

log = logging.getLogger(__name__)

Step = tuple[str, tuple[Any, ...], dict[str, Any]]
Reply = tuple[str, Any, Ref | None]  # ("ok", value, target) or ("err", EncodedError, target)
MAX_OBJECTS = 100_000
STREAM_WINDOW = 8  # output chunks in flight per stream before the actor stops reading
RESERVE_WAIT = 2.0  # how long one build waits for Ray to grant a slot (the placer tries again)
MAX_RESERVE_WAIT = 60.0
REAP_INTERVAL = 1.0  # how soon a sandbox that ended on its own gives its Ray slot back


CONFIG_STEP = "__config__"  # the first step of ``capsa.ray.remote(local_builder)``


def replay(steps: Sequence[Step], policy: NodePolicy | None = None) -> SandboxBuilder:
    """A local builder from the calls recorded on a ``capsa.ray`` builder, each call's host paths
    and ports checked against ``policy`` before the call (default: a node that allows none)."""
    policy = policy or NodePolicy()
    allowed = surface("SandboxBuilder").chains
    builder = SandboxBuilder()
    for index, (name, args, kwargs) in enumerate(steps):
        if name == CONFIG_STEP and index == 0 and len(args) == 1 and not kwargs:
            builder = SandboxBuilder(policy.config(args[0]))
            continue
        if name not in allowed:
            raise ConfigError(f"SandboxBuilder has no builder method {name!r}")
        method = getattr(builder, name)
        checked, named = policy.arguments(method, tuple(args), dict(kwargs))
        builder = method(*checked, **named)
    return SandboxBuilder(policy.config(builder.config))  # all of it again, as the VM will see it


class _PrewarmedBuilder(SandboxBuilder):
    """What a warm pool builds with: the sandbox, then one ``exec("true")`` in it, so that the
    caller's first command does not pay QEMU's translation of the exec path after a restore
    (docs/architecture.md, Facts: "TCG translation"; ~0.2-0.5 s under TCG, nothing with KVM)."""

    def _with(self, **changes: Any) -> _PrewarmedBuilder:
        return _PrewarmedBuilder(replace(self.config, **changes))

    async def build(self, timeout: float = DEFAULT_BUILD_TIMEOUT) -> Sandbox:
        vm = await super().build(timeout)
        try:
            await vm.agent.exec("true").timeout(timeout).run()
        except BaseException:
            await vm.kill()
            raise
        return vm


class HostActor:
    """Owns the sandboxes and warm pools of one node. Methods are called by ``capsa.ray``."""

    def __init__(self, slots: int, policy: NodePolicy | None = None) -> None:
        self.slots = slots
        # The node owner's limits, from this worker's environment (``ray start``'s), never the
        # caller's; ``policy`` is for tests without Ray.
        self.policy = policy if policy is not None else NodePolicy.from_environ()
        self._objects: dict[int, Any] = {}
        self._owner: dict[int, int] = {}  # oid -> oid of the sandbox it belongs to
        self._by_identity: dict[int, int] = {}  # id(object) -> oid
        self._roots: dict[int, Sandbox] = {}
        self._building = 0
        self._pools: dict[str, Pool] = {}
        self._held: dict[int | str, Reservation] = {}  # root oid (or pool key) -> its Ray slots
        self._ids = itertools.count(1)
        self._node_id = ""
        self._reaper: asyncio.Task[None] | None = None

    # -- bookkeeping --

    def _register(self, obj: object, owner: int | None) -> int:
        oid = self._by_identity.get(id(obj))
        if oid is not None and self._objects.get(oid) is obj:
            return oid
        if len(self._objects) >= MAX_OBJECTS:
            raise CapsaError(f"the host actor holds {MAX_OBJECTS} remote objects; stop sandboxes")
        oid = next(self._ids)
        self._objects[oid] = obj
        self._by_identity[id(obj)] = oid
        self._owner[oid] = oid if owner is None else owner
        if owner is None and isinstance(obj, Sandbox):
            self._roots[oid] = obj
        return oid

    def _forget(self, root: int) -> None:
        for oid in [oid for oid, owner in self._owner.items() if owner == root]:
            obj = self._objects.pop(oid, None)
            self._owner.pop(oid, None)
            if obj is not None:
                self._by_identity.pop(id(obj), None)
        self._roots.pop(root, None)
        self._release(root)

    def _release(self, holder: int | str) -> None:
        reservation = self._held.pop(holder, None)
        if reservation is not None:
            reservation.release()

    async def _reserve(self, count: int, wait: float) -> Reservation | None:
        """``count`` slots through Ray (None if Ray cannot grant them in ``wait`` seconds)."""
        return await reserve(count, min(max(float(wait), 0.1), MAX_RESERVE_WAIT))

    def _reap(self) -> None:
        """Forget sandboxes that ended on their own (lifetime, guest power-off, crash)."""
        for oid, vm in list(self._roots.items()):
            if vm.status.is_final:
                self._forget(oid)

    def _watch(self) -> None:
        """Reap on a timer while sandboxes hold Ray slots: one that ends on its own (lifetime,
        power-off) frees its slot for every driver, even if this one never calls again."""
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(self._reap_while_held())

    async def _reap_while_held(self) -> None:
        while self._held:
            await asyncio.sleep(REAP_INTERVAL)
            self._reap()

    def _used(self) -> int:
        self._reap()
        return len(self._roots) + self._building + sum(pool.size for pool in self._pools.values())

    def _ref(self, obj: object, owner: int | None, seen: set[int] | None = None) -> Ref:
        kind = proxied_name(obj)
        assert kind is not None
        oid = self._register(obj, owner)
        owner = self._owner[oid]
        ref = Ref(oid, kind)
        seen = set() if seen is None else seen
        if oid in seen:
            return ref
        seen.add(oid)
        public = {name for name in vars(obj) if not name.startswith("_")}
        for name in sorted(surface(kind).properties | public):
            try:
                value = getattr(obj, name)
            except Exception as exc:
                ref.errors[name] = encode_error(exc)
                continue
            if proxied_name(value) is not None:
                ref.children[name] = self._ref(value, owner, seen)
            elif is_plain(value):
                ref.state[name] = value
        return ref

    def _encode(self, value: object, owner: int | None) -> object:
        if proxied_name(value) is not None:
            return self._ref(value, None if isinstance(value, Sandbox) else owner)
        if isinstance(value, list | tuple):
            return type(value)(self._encode(v, owner) for v in value)
        return value

    # -- called through Ray --

    async def hello(self) -> dict[str, Any]:
        """Who this actor is (and where its VMs' runtime files live, for leak checks)."""
        import ray  # noqa: PLC0415 - Ray is optional for capsa

        self._node_id = ray.get_runtime_context().get_node_id()
        return {
            "node_id": self._node_id,
            "actor_id": ray.get_runtime_context().get_actor_id() or "",
            "pid": os.getpid(),
            "slots": self.slots,
            "runtime_root": str(runtime.runtime_root()),
        }

    async def load(self) -> tuple[int, int]:
        """``(used, slots)``: live sandboxes, builds in flight and pool sizes against the slots."""
        return self._used(), self.slots

    async def build(
        self, steps: list[Step], timeout: float, reserve_wait: float = RESERVE_WAIT
    ) -> Reply | None:
        """Build a sandbox from recorded builder calls (from this node's warm pool when one matches);
        ``None`` when this node has no free slot (the caller tries another node): none by this
        actor's count, or Ray granted none within ``reserve_wait`` (another driver holds them)."""
        if self._used() + 1 > self.slots:
            return None
        self._building += 1
        reservation: Reservation | None = None
        try:
            builder = replay(steps, self.policy)  # refused before any slot is taken
            reservation = await self._reserve(1, reserve_wait)
            if reservation is None:
                return None
            pool = self._pools.get(repr(builder.config))
            vm = await (pool.take(timeout) if pool is not None else builder.build(timeout))
        except Exception as exc:
            if reservation is not None:
                reservation.release()
            return ("err", encode_error(exc), None)
        finally:
            self._building -= 1
        ref = self._ref(vm, None)
        self._held[ref.oid] = reservation
        self._watch()
        return ("ok", ref, None)

    async def warm(self, steps: list[Step], size: int) -> Reply:
        """Keep ``size`` sandboxes of this recipe booted on this node (``size`` 0 removes the pool)."""
        try:
            builder = replay(steps, self.policy)
            key = repr(builder.config)
            old = self._pools.pop(key, None)
            if old is not None:
                await old.close()
            self._release(key)
            if size > 0:
                reservation = None
                if self._used() + size <= self.slots:
                    reservation = await self._reserve(size, RESERVE_WAIT)
                if reservation is None:
                    raise NoSlotError(
                        f"a warm pool of {size} does not fit: {self._used()} of {self.slots} "
                        "slots are used on this node by this driver, or Ray has not that many "
                        "free (other drivers' sandboxes hold slots too)",
                        hint="give the node more capsa_slots or warm fewer sandboxes per node",
                    )
                self._held[key] = reservation
                self._pools[key] = Pool(_PrewarmedBuilder(builder.config), size)
        except Exception as exc:
            return ("err", encode_error(exc), None)
        return ("ok", None, None)

    async def call(self, oid: int, steps: list[Step]) -> Reply:
        """Call ``steps[-1]`` on the object ``oid`` after the recorded builder ``steps[:-1]``
        (e.g. ``exec("ls")``, ``arg("/")``, then ``run()``); only names of the derived surface."""
        target: object = None
        forks: list[Reservation] = []
        try:
            target = self._get(oid)
            obj = target
            for name, args, kwargs in steps[:-1]:
                if name not in _surface_of(obj).chains:
                    raise ConfigError(f"{type(obj).__name__} has no builder method {name!r}")
                obj = getattr(obj, name)(*args, **kwargs)
            name, args, kwargs = steps[-1]
            if name not in _surface_of(obj).calls:
                raise ConfigError(f"{type(obj).__name__}.{name} is not available through capsa.ray")
            method = getattr(obj, name)
            args, kwargs = self.policy.arguments(method, tuple(args), dict(kwargs))
            if isinstance(obj, Sandbox) and name == "fork":
                forks = await self._reserve_forks(args, kwargs)
            result = method(*args, **kwargs)
            if inspect.isawaitable(result):
                result = await result
            owner = self._owner.get(oid)
            value = self._encode(result, owner)
            if forks:
                self._hold_forks(result, forks)
            ref = self._ref(target, owner) if oid in self._objects else None
            if isinstance(obj, Sandbox) and name in ENDING_CALLS:
                self._forget(oid)
            return ("ok", value, ref)
        except Exception as exc:
            for reservation in forks:
                reservation.release()
            ref = None
            if target is not None and oid in self._objects:
                ref = self._ref(target, self._owner.get(oid))
            return ("err", encode_error(exc), ref)

    async def iterate(self, oid: int) -> AsyncIterator[bytes | Failure]:
        """Stream an output stream's chunks (a Ray streaming generator on the caller's side)."""
        try:
            stream = self._get(oid)
            if not _surface_of(stream).iterable:
                raise ConfigError(f"{type(stream).__name__} cannot be iterated")
            async for chunk in stream:
                yield chunk
        except Exception as exc:
            yield Failure(encode_error(exc))

    async def vm_pids(self) -> list[int]:
        """QEMU pids of every sandbox this actor owns, pooled ones included (for leak checks)."""
        vms = list(self._roots.values())
        for pool in self._pools.values():
            vms.extend(pool.waiting)
        return [vm.pid for vm in vms if vm.pid is not None and not vm.status.is_final]

    async def close(self) -> None:
        """Stop every pool and sandbox of this node (the actor may be killed afterwards)."""
        for key, pool in list(self._pools.items()):
            await pool.close()
            self._release(key)
        self._pools.clear()
        for oid, vm in list(self._roots.items()):
            try:
                await vm.kill()
            except Exception:
                log.exception("killing a sandbox failed")
            self._forget(oid)

    # -- helpers --

    def _get(self, oid: int) -> Any:
        self._reap()
        try:
            return self._objects[oid]
        except KeyError:
            raise VMNotRunning(
                "this remote sandbox object is gone (its sandbox was stopped or ended)",
                hint="build a new sandbox",
            ) from None

    async def _reserve_forks(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Reservation]:
        """One Ray slot per fork, before forking (forks stay on their parent's node)."""
        count = kwargs.get("count", args[0] if args else 1)
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            return []  # fork() itself refuses it
        error = NoSlotError(
            f"fork({count}) needs {count} free slots on this node; "
            f"{self._used()} of {self.slots} are used by this driver",
            hint="forks stay on their parent's node: fork fewer, or give the node more slots "
            "(other drivers' sandboxes hold slots too)",
        )
        if self._used() + count > self.slots:
            raise error
        held: list[Reservation] = []
        for _ in range(count):
            reservation = await self._reserve(1, RESERVE_WAIT)
            if reservation is None:
                for taken in held:
                    taken.release()
                raise error
            held.append(reservation)
        return held

    def _hold_forks(self, result: object, forks: list[Reservation]) -> None:
        """Each fork holds one of the slots reserved for it; slots of forks that did not come back
        are released."""
        clones = result if isinstance(result, list) else []
        for clone in clones:
            oid = self._by_identity.get(id(clone))
            if forks and oid is not None and oid in self._roots and oid not in self._held:
                self._held[oid] = forks.pop()
                self._watch()
        for reservation in forks:
            reservation.release()
        forks.clear()


# What ``@ray.method`` would set, set without importing Ray (it reads them at ``ray.remote``): the
# output stream is a streaming generator with back-pressure, so a process's unread output holds the
# process back as it does locally, instead of piling up in the object store.
setattr(HostActor.iterate, "__ray_num_returns__", "streaming")  # noqa: B010
setattr(HostActor.iterate, "__ray_generator_backpressure_num_objects__", STREAM_WINDOW)  # noqa: B010


def _surface_of(obj: object) -> Any:
    kind = proxied_name(obj)
    if kind is None and BUILDERS.get(type(obj).__name__) is type(obj):
        kind = type(obj).__name__
    if kind is None:
        raise ConfigError(f"{type(obj).__name__} is not reachable through capsa.ray")
    return surface(kind)


__all__ = ["EncodedError", "HostActor", "NoSlotError", "replay"]
