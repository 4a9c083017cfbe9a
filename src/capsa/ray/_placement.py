"""Finding the nodes that run VMs, starting one host actor on each, and choosing where to build.

Nodes opt in with the custom resource ``capsa_slots: N`` (how many sandboxes they run at once). The
driver starts one host actor per such node, pinned there with a hard node-affinity strategy, using
no CPU of its own. The actors are *not* detached: Ray kills them when the driver's job ends, and
their QEMU children die with them (``PR_SET_PDEATHSIG``). Slots are counted by each actor (live
sandboxes, builds in flight and warm pools), so a placement is one round trip: the least-loaded
node is asked to build, and refuses if another caller took its last slot meanwhile. Each actor also
holds every slot it uses through Ray (``_slots``), so another driver's sandboxes count too: a node
whose slots Ray will not grant refuses as a full one does, and the placer tries again until its
wait is over.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from capsa._tasks import TaskSet
from capsa.errors import CapsaError, SandboxLost
from capsa.ray._host import RESERVE_WAIT, HostActor, NoSlotError, Step
from capsa.ray._slots import SLOT_RESOURCE, release_orphans
from capsa.ray._wire import decode_error

log = logging.getLogger(__name__)

HELLO_TIMEOUT = 120.0  # a new worker process on a busy node can take a while to start
LOAD_TIMEOUT = 15.0
NODES_TIMEOUT = 30.0
_NODES_TTL = 1.0


def _lost_errors() -> tuple[type[BaseException], ...]:
    import ray.exceptions as rex  # noqa: PLC0415 - Ray is optional for capsa

    return (rex.RayActorError, rex.ObjectLostError, rex.NodeDiedError, rex.WorkerCrashedError)


@dataclass
class Host:
    """The driver's view of one host actor."""

    node_id: str
    actor: Any
    slots: int
    labels: dict[str, str]
    pid: int = 0
    actor_id: str = ""
    runtime_root: str = ""
    lost: bool = False
    pending: int = 0  # this driver's builds sent here and not answered yet

    @property
    def where(self) -> str:
        return f"node {self.node_id[:12]}"

    def lost_error(self, cause: BaseException) -> SandboxLost:
        self.lost = True
        return SandboxLost(
            f"the sandbox's Ray node {self.node_id[:12]} (or its capsa host actor) died: "
            f"{type(cause).__name__}",
            node_id=self.node_id,
            hint="its VMs are gone with it; build a new sandbox (it lands on a live node). "
            "capsa never retries a call behind your back",
        )

    async def request(self, ref: Any, timeout: float | None = None) -> Any:
        """Await a Ray call to this actor; node or actor death becomes :class:`SandboxLost`."""
        try:
            async with asyncio.timeout(timeout):
                return await ref
        except _lost_errors() as exc:
            raise self.lost_error(exc) from None

    async def reply(self, ref: Any, timeout: float | None = None) -> Any:
        """Await a ``("ok"|"err", value, target)`` reply; re-raise the actor's error here."""
        status, value, _ = await self.request(ref, timeout)
        if status == "err":
            raise decode_error(value, self.where)
        return value


@dataclass
class Constraint:
    node_id: str | None = None
    label: str | None = None

    def matches(self, host: Host) -> bool:
        if self.node_id is not None and host.node_id != self.node_id:
            return False
        if self.label is not None:
            key, sep, value = self.label.partition("=")
            if key not in host.labels or (sep and host.labels[key] != value):
                return False
        return True

    def describe(self) -> str:
        parts = [f"node_id={self.node_id}"] if self.node_id else []
        parts += [f"label {self.label!r}"] if self.label else []
        return " and ".join(parts)


@dataclass
class Placer:
    """This driver's host actors (one per node with capsa slots) and the warm-pool recipes."""

    job_id: str
    hosts: dict[str, Host] = field(default_factory=dict)
    warm: dict[str, tuple[list[Step], int]] = field(default_factory=dict)
    _lock: asyncio.Lock | None = None
    _lock_loop: asyncio.AbstractEventLoop | None = None
    _nodes_at: float = 0.0
    _actor_class: Any = None
    _tasks: TaskSet = field(default_factory=lambda: TaskSet(log))
    _starting: dict[str, asyncio.Task[Host | BaseException]] = field(default_factory=dict)

    def _get_lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        if self._lock is None or self._lock_loop is not loop:  # a new event loop (asyncio.run)
            self._lock, self._lock_loop = asyncio.Lock(), loop
            self._tasks, self._starting = TaskSet(log), {}
        return self._lock

    async def refresh(self, force: bool = False) -> list[Host]:
        """The live host actors, after starting one on each new node with capsa slots."""
        import ray  # noqa: PLC0415

        async with self._get_lock():
            if force or time.monotonic() - self._nodes_at > _NODES_TTL:
                try:
                    nodes = await asyncio.wait_for(asyncio.to_thread(ray.nodes), NODES_TIMEOUT)
                except TimeoutError:
                    raise CapsaError(
                        f"Ray's GCS did not list the nodes within {NODES_TIMEOUT:.0f}s",
                        hint="check that the Ray head node is up (ray status)",
                    ) from None
                self._nodes_at = time.monotonic()
                wanted = {
                    n["NodeID"]: n
                    for n in nodes
                    if n.get("Alive") and n.get("Resources", {}).get(SLOT_RESOURCE, 0) >= 1
                }
                for node_id in list(self.hosts):
                    if node_id not in wanted or self.hosts[node_id].lost:
                        host = self.hosts.pop(node_id)
                        if node_id in wanted:  # the actor died but the node lives: a new actor
                            _kill_quietly(host.actor)
                        self._tasks.spawn(_release_orphans(host), name="capsa-ray-release")
                for node_id, node in wanted.items():
                    if node_id not in self.hosts and node_id not in self._starting:
                        self._starting[node_id] = self._tasks.spawn(
                            self._start(node), name=f"capsa-ray-host-{node_id[:12]}"
                        )
            if self._starting and not self.hosts:  # the first placement waits for every node
                await asyncio.wait(self._starting.values(), timeout=HELLO_TIMEOUT)
            for node_id, task in list(self._starting.items()):  # later ones join when ready
                if task.done():
                    del self._starting[node_id]
                    result = task.result()
                    if isinstance(result, Host):
                        self.hosts[node_id] = result
                    else:
                        log.warning("capsa.ray: no host actor on node %s: %r", node_id[:12], result)
            return [h for h in self.hosts.values() if not h.lost]

    async def _start(self, node: dict[str, Any]) -> Host | BaseException:
        """A host actor on ``node`` (or why it could not start: a node that just died, ...)."""
        try:
            return await self._start_actor(node)
        except Exception as exc:
            return exc

    async def _start_actor(self, node: dict[str, Any]) -> Host:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # noqa: PLC0415

        import ray  # noqa: PLC0415

        if self._actor_class is None:
            self._actor_class = ray.remote(HostActor)
        node_id = node["NodeID"]
        slots = int(node["Resources"][SLOT_RESOURCE])
        actor = self._actor_class.options(
            num_cpus=0,
            max_restarts=0,
            max_task_retries=0,
            max_concurrency=1000,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
        ).remote(slots)
        labels = {str(k): str(v) for k, v in (node.get("Labels") or {}).items()}
        host = Host(node_id, actor, slots, labels)
        info = await host.request(actor.hello.remote(), HELLO_TIMEOUT)
        host.pid, host.runtime_root = info["pid"], info["runtime_root"]
        host.actor_id = info["actor_id"]
        for steps, size in self.warm.values():
            await host.reply(actor.warm.remote(steps, size), HELLO_TIMEOUT)
        log.info("capsa.ray: host actor on node %s (%d slots)", node_id[:12], slots)
        return host

    async def loads(self, hosts: list[Host]) -> list[tuple[Host, int, int]]:
        async def one(host: Host) -> tuple[Host, int, int] | None:
            try:
                used, slots = await host.request(host.actor.load.remote(), LOAD_TIMEOUT)
            except (SandboxLost, TimeoutError):
                host.lost = True
                return None
            return host, used, slots

        results = await asyncio.gather(*(one(h) for h in hosts))
        return [r for r in results if r is not None]

    async def place(
        self, steps: list[Step], constraint: Constraint, wait: float, timeout: float
    ) -> tuple[Host, Any]:
        """Build on the least-loaded matching node with a free slot, waiting up to ``wait`` seconds
        for one; :class:`NoSlotError` after that."""
        deadline = time.monotonic() + wait
        seen: list[tuple[str, int, int]] = []
        while True:
            hosts = [h for h in await self.refresh() if constraint.matches(h)]
            loads = await self.loads(hosts)
            seen = [(h.node_id, used, slots) for h, used, slots in loads]
            for host, used, slots in sorted(loads, key=_load_key):
                if used + host.pending >= slots:
                    continue
                host.pending += 1  # before any await: concurrent placements see it and spread
                reserve_wait = min(RESERVE_WAIT, max(0.5, deadline - time.monotonic()))
                try:
                    reply = await host.request(host.actor.build.remote(steps, timeout, reserve_wait))
                except SandboxLost:
                    continue  # nothing ran there that a caller saw: another node may build it
                finally:
                    host.pending -= 1
                if reply is None:
                    continue  # another caller (or driver) took the last slot meanwhile
                status, value, _ = reply
                if status == "err":
                    raise decode_error(value, host.where)
                return host, value
            if time.monotonic() >= deadline:
                raise _no_slot(seen, constraint, wait)
            await asyncio.sleep(min(0.5, max(0.05, deadline - time.monotonic())))


def _load_key(entry: tuple[Host, int, int]) -> tuple[float, int]:
    host, used, slots = entry
    busy = used + host.pending
    return busy / max(slots, 1), busy


def _no_slot(seen: list[tuple[str, int, int]], constraint: Constraint, wait: float) -> CapsaError:
    which = f" matching {constraint.describe()}" if constraint.describe() else ""
    if not seen:
        return NoSlotError(
            f"no live Ray node{which} offers capsa slots (waited {wait:g}s)",
            hint=f"start nodes with the custom resource {SLOT_RESOURCE}, e.g. ray start "
            f"--resources='{{\"{SLOT_RESOURCE}\": 8}}'; check the node(...) constraint",
        )
    usage = ", ".join(f"{node[:12]} {used}/{slots}" for node, used, slots in seen)
    return NoSlotError(
        f"every Ray node{which} has all its capsa slots in use after waiting {wait:g}s (used by "
        f"this driver: {usage}; other drivers' sandboxes hold slots too)",
        nodes=seen,
        hint="stop sandboxes you no longer need, add nodes with capsa_slots, or wait longer "
        "with .placement_timeout(seconds)",
    )


async def _release_orphans(host: Host) -> None:
    """The Ray slots a dead host actor still held (placement groups outlive their actor)."""
    if host.actor_id:
        removed = await asyncio.wait_for(asyncio.to_thread(release_orphans, host.actor_id), 60)
        if removed:
            log.info("capsa.ray: released %d slot reservation(s) of a dead host actor", removed)


def _kill_quietly(actor: Any) -> None:
    import ray  # noqa: PLC0415

    try:
        ray.kill(actor, no_restart=True)
    except Exception:
        log.debug("capsa.ray: killing a lost host actor failed", exc_info=True)


_placer: Placer | None = None


def placer() -> Placer:
    """This driver's placer (a new one after ``ray.shutdown()`` and ``ray.init()``)."""
    import ray  # noqa: PLC0415

    global _placer
    if not ray.is_initialized():
        raise CapsaError(
            "capsa.ray needs a connected Ray driver",
            hint='call ray.init() (or ray.init(address="auto") for an existing cluster) first',
        )
    job = ray.get_runtime_context().get_job_id()
    if _placer is None or _placer.job_id != job:
        _placer = Placer(job)
    return _placer
