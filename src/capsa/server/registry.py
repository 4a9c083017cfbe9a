"""The server's sandboxes: creation (from warm pools when there are), lookup, lifetimes, removal."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import capsa
from capsa._tasks import TaskSet
from capsa.errors import CapsaError
from capsa.server import _cluster
from capsa.server.entry import (
    DEFAULT_TIMEOUT,
    INTERPRETER_TEMPLATE,
    TEMPLATES,
    ApiError,
    Entry,
    check_timeout,
    close_watchers,
    named_image,
    visible,
)
from capsa.server.envd import HOME
from capsa.server.interpreter import Interpreter
from capsa.server.lifecycle_end import end_of, pause_all
from capsa.server.pausing import Pausing
from capsa.server.quota import LimitReached, Quota, TenantLimits
from capsa.server.server_secrets import ServerSecrets
from capsa.server.snapshots import SnapshotStore
from capsa.server.tenants import DEFAULT_TENANT
from capsa.vm import RunState

if TYPE_CHECKING:
    from capsa.net.secrets import Secret
    from capsa.server.durable import Journal

log = logging.getLogger(__name__)

_REAP_INTERVAL = 0.5
_PROBE_INTERVAL = 2.0  # how often the reaper asks the Ray nodes whether their sandboxes still run
_PROBE_TIMEOUT = 10.0
_POOL_TAKE_TIMEOUT = 60.0


_TEMPLATES_HINT = f"templates: {', '.join(TEMPLATES)}, or a name from `capsa image ls`"


class Registry(Pausing):
    """Creates sandboxes per template (taking them from ``pools`` when one is configured), stops
    them when their E2B timeout (a capsa lifetime) ends, and kills them all on ``close()``."""

    def __init__(
        self,
        *,
        memory_mb: int = 512,
        pools: dict[str, int] | None = None,
        max_sandboxes: int | None = None,
        tenant_limits: dict[str, TenantLimits] | None = None,
        on_removed: Callable[[Entry], Awaitable[None]] | None = None,
        on_paused: Callable[[Entry], Awaitable[None]] | None = None,
        dns_servers: tuple[str, ...] = (),
        allow_internal_destinations: bool = False,
        ray_address: str | None = None,
        max_timeout: int | None = None,
        journal: Journal | None = None,
        shutdown_timeout: float = 30.0,
        secrets: ServerSecrets | None = None,
    ) -> None:
        for name in pools or {}:
            if name not in TEMPLATES and named_image(name) is None:
                raise CapsaError(f"unknown template {name!r} in --pool", hint=_TEMPLATES_HINT)
        self.memory_mb = memory_mb
        self.max_sandboxes = max_sandboxes
        self.quota = Quota(max_sandboxes, tenant_limits)
        self._pool_sizes = dict(pools or {})
        self._pools: dict[str, capsa.Pool] = {}
        # code-interpreter sandboxes taken from their pool with the interpreter already started
        self._warm: deque[tuple[capsa.Sandbox, Interpreter]] = deque()
        self._warm_wanted = asyncio.Event()
        self._entries: dict[str, Entry] = {}
        self._tasks = TaskSet(log)
        self._reaper: asyncio.Task[None] | None = None
        self._on_removed = on_removed
        self._on_paused = on_paused  # called with the VM still there, before it is freed
        self._paused_root: Path | None = None if journal is None else journal.paused_root
        self.journal = journal  # the state dir's records (--state-dir); None: all in memory
        self.shutdown_timeout = shutdown_timeout  # close() pauses the running ones within it
        self._dns_servers = dns_servers
        self._internal = allow_internal_destinations
        self.ray_address = ray_address  # place sandboxes on a Ray cluster's capsa host actors
        self.snapshots = SnapshotStore(journal=journal)  # create_snapshot's: outlive their sandboxes
        self.max_timeout = max_timeout
        self.secrets = secrets or ServerSecrets()  # the operator's (--secrets-file)
        self.closed = False

    def check_timeout(self, value: object, *, zero: bool = False) -> int:
        """A request's timeout, within this server's ``--max-timeout`` (``zero``: 0 is one)."""
        return check_timeout(value, self.max_timeout, zero=zero)

    def builder(
        self, template: str, policy: capsa.NetworkPolicy | None = None, secrets: tuple[Secret, ...] = ()
    ) -> capsa.SandboxBuilder:
        # E2B's sandboxes have the user's home, where relative paths and commands start
        builder = capsa.sandbox().memory_mb(self.memory_mb).warmup(f"mkdir -p {HOME}")
        image = None if template in TEMPLATES else named_image(template)
        if image is not None:
            builder = builder.image(image)
        if policy is None:
            return builder
        gateway = capsa.Gateway().policy(policy)
        if self._dns_servers:
            gateway = gateway.dns_servers(list(self._dns_servers))
        if self._internal:
            gateway = gateway.allow_internal_destinations()
        gateway = self.secrets.gateway(gateway, secrets)
        return builder.network(capsa.VirtualNetwork.with_gateway(gateway))

    async def start(self) -> None:
        if self.journal is not None:  # what the last run kept: paused sandboxes, snapshots
            for entry in self.journal.recover():
                self.quota.adopt_paused(entry.tenant)
                self._entries[entry.id] = entry
            self.snapshots.load()
        if self.ray_address is not None:
            await _cluster.connect(self.ray_address)
            for name, size in self._pool_sizes.items():  # --pool T=N: N per node
                await _cluster.warm(self.builder(name), size)
            self._reaper = self._tasks.spawn(self._reap(), name="capsa-server-reaper")
            return
        for name, size in self._pool_sizes.items():
            self._pools[name] = await capsa.pool(self.builder(name), size)
        self._reaper = self._tasks.spawn(self._reap(), name="capsa-server-reaper")
        if INTERPRETER_TEMPLATE in self._pools:
            self._tasks.spawn(self._keep_warm(), name="capsa-server-interpreter-warmer")

    async def _keep_warm(self) -> None:
        """Keep the code-interpreter pool's sandboxes with their interpreter started, so that a
        create is a take and the first ``run_code`` needs no Python start-up."""
        pool = self._pools[INTERPRETER_TEMPLATE]
        while not self.closed:
            self._warm = deque(pair for pair in self._warm if pair[0].status is RunState.RUNNING)
            if len(self._warm) >= self._pool_sizes[INTERPRETER_TEMPLATE]:
                self._warm_wanted.clear()
                await self._warm_wanted.wait()
                continue
            try:
                vm = await pool.take(_POOL_TAKE_TIMEOUT)
            except CapsaError as exc:
                log.warning("warming an interpreter sandbox: %s", exc.message)
                await asyncio.sleep(1.0)
                continue
            interpreter = Interpreter(vm, {})
            try:
                await interpreter.warm()
            except Exception as exc:
                log.warning("starting the interpreter of a pooled sandbox failed: %s", exc)
                await vm.kill()
                await asyncio.sleep(1.0)
                continue
            if self.closed:
                await vm.kill()
                return
            self._warm.append((vm, interpreter))
            wanted = self._pool_sizes[INTERPRETER_TEMPLATE]
            log.info("interpreter sandboxes warm: %d of %d", len(self._warm), wanted)

    def pool_ready(self) -> bool:
        return all(pool.available > 0 for pool in self._pools.values())

    def pool_fill(self) -> dict[str, tuple[int | None, int]]:
        """Each ``--pool`` template's (sandboxes ready now, size); ready is None with ``--ray``
        (the pools are on the nodes). Warm interpreter sandboxes count as ready."""
        fill: dict[str, tuple[int | None, int]] = {}
        for name, size in self._pool_sizes.items():
            pool = self._pools.get(name)
            ready = None if pool is None else pool.available
            if ready is not None and name == INTERPRETER_TEMPLATE:
                ready += len(self._warm)
            fill[name] = (ready, size)
        return fill

    # -- create / lookup --

    async def create(
        self,
        template: str,
        *,
        timeout: int = DEFAULT_TIMEOUT,
        metadata: dict[str, str] | None = None,
        envs: dict[str, str] | None = None,
        policy: capsa.NetworkPolicy | None = None,
        tenant: str = DEFAULT_TENANT,
        make_policy: Callable[[], capsa.NetworkPolicy | None] | None = None,
        auto_pause: bool = False,
        auto_resume: bool = False,
        pause_memory: bool = True,
        volumes: tuple[tuple[capsa.Volume, str], ...] = (),
        secret_names: tuple[str, ...] = (),
        transforms: tuple[Secret, ...] = (),
    ) -> Entry:
        """A new sandbox of ``tenant``, with ``volumes`` ((volume, guest path) pairs). Its slot
        (:class:`Quota`) is taken before the first ``await`` and kept by the entry, or given back if
        the create fails. ``make_policy``, when given, makes the policy once the slot is taken: a
        request refused by the cheap checks costs the server's event loop nothing for its network
        lists. ``secret_names`` (the operator's) and ``transforms`` (E2B's header rules): checked
        by the caller, against the policy too (:func:`capsa.server.server_secrets.secrets_policy`)."""
        if self.closed:
            raise ApiError(503, "the server is shutting down")
        if template not in TEMPLATES and named_image(template) is None:
            raise ApiError(404, f"template {template!r} not found", hint=_TEMPLATES_HINT)
        if auto_pause and self.ray_address is not None:
            raise ApiError(
                501,
                "on_timeout='pause' is not supported by capsa serve --ray",
                hint="pause is not supported there either; use on_timeout='kill'",
            )
        try:
            self.quota.reserve(tenant)
        except LimitReached as exc:
            raise ApiError(429, exc.message, hint=exc.hint) from None
        try:
            if make_policy is not None:
                policy = make_policy()
            entry = await self._boot(
                template,
                timeout,
                metadata,
                envs,
                policy=policy,
                tenant=tenant,
                auto_pause=auto_pause,
                volumes=volumes,
                secret_names=secret_names,
                transforms=transforms,
            )
            entry.auto_resume, entry.pause_memory = auto_resume, pause_memory
        except BaseException:
            self.quota.release(tenant)
            raise
        try:
            if self.journal is not None:
                self.journal.running(entry)
        except ApiError:
            self.quota.release(tenant)
            await entry.vm.kill()
            raise
        self._entries[entry.id] = entry  # the slot is the entry's now: _destroy gives it back
        if self.closed:  # close() ran while this one was booting
            self._entries.pop(entry.id, None)
            await self._destroy(entry, "server_shutdown")
            raise ApiError(503, "the server is shutting down")
        log.info(
            "sandbox %s created (template %s, tenant %s, timeout %ss)",
            entry.id,
            template,
            tenant,
            timeout,
        )
        return entry

    async def _boot(
        self,
        template: str,
        timeout: int,
        metadata: dict[str, str] | None,
        envs: dict[str, str] | None,
        *,
        policy: capsa.NetworkPolicy | None,
        tenant: str,
        auto_pause: bool = False,
        volumes: tuple[tuple[capsa.Volume, str], ...] = (),
        secret_names: tuple[str, ...] = (),
        transforms: tuple[Secret, ...] = (),
    ) -> Entry:
        """Take or build the VM and make its entry (not stored yet: the caller does)."""
        interpreter = None
        secrets = self.secrets.resolve(secret_names) + transforms
        if secrets and self.ray_address is not None:
            raise ApiError(501, "secrets and network.rules are not supported by capsa serve --ray",
                           hint="a secret's value never leaves the server's process")  # fmt: skip
        if volumes:  # its own disks: never from a pool (docs/volumes.md)
            if self.ray_address is not None:
                raise ApiError(501, "volumes are not supported by capsa serve --ray")
            builder = self.builder(template, policy, secrets)
            for volume, path in volumes:
                builder = builder.volume(volume, path)
            vm = await builder.build()
        elif self.ray_address is not None:  # on a node (from its warm pool when there is one)
            vm = await _cluster.build(self.builder(template, policy))
        elif policy is not None:  # a network of its own: never from a pool
            vm = await self.builder(template, policy, secrets).build()
        elif template == INTERPRETER_TEMPLATE and self._warm:
            vm, interpreter = self._warm.popleft()
            self._warm_wanted.set()
        else:
            pool = self._pools.get(template)
            vm = await (pool.take(_POOL_TAKE_TIMEOUT) if pool else self.builder(template).build())
        entry = Entry.start(
            vm,
            template=template,
            metadata=metadata,
            envs=envs,
            memory_mb=self.memory_mb,
            interpreter=interpreter,
            node_id=getattr(vm, "node_id", None),
            tenant=tenant,
            policy=policy,
            auto_pause=auto_pause,
            secret_names=secret_names,
            transforms=transforms,
        )
        try:
            if interpreter is not None:
                await interpreter.set_env(entry.envs)
            await entry.set_timeout(timeout)
        except BaseException:
            await vm.kill()
            raise
        return entry

    def get(self, sandbox_id: str, tenant: str | None = None) -> Entry:
        """A running sandbox that a caller seeing ``tenant`` (None: all) may see. Another
        tenant's sandbox is not found, with the same answer as an unknown id."""
        entry = self._entries.get(sandbox_id)
        if entry is None or not entry.running or not visible(entry.tenant, tenant):
            raise ApiError(404, f"sandbox {sandbox_id!r} not found")
        return entry

    def list(self, tenant: str | None = None) -> list[Entry]:
        """Running and paused sandboxes (of ``tenant``; None: all)."""
        return [
            e
            for e in self._entries.values()
            if (e.running or ((e.paused or e.pausing) and not e.closing)) and visible(e.tenant, tenant)
        ]

    def find(self, sandbox_id: str, tenant: str | None = None) -> Entry:
        """A running or paused sandbox (that a caller seeing ``tenant`` may see)."""
        entry = self._entries.get(sandbox_id)
        live = entry is not None and (entry.running or entry.paused is not None or entry.pausing)
        if entry is None or not live or not visible(entry.tenant, tenant):
            raise ApiError(404, f"sandbox {sandbox_id!r} not found")
        return entry

    def __len__(self) -> int:
        return sum(1 for entry in self._entries.values() if entry.running)

    # -- removal --

    async def kill(self, sandbox_id: str, tenant: str | None = None) -> None:
        entry = self.find(sandbox_id, tenant)  # no await between the lookup and the pop
        self._entries.pop(sandbox_id)
        paused = entry.paused is not None or entry.pausing
        await self._destroy(entry, "paused_then_killed" if paused else "killed")

    async def _destroy(self, entry: Entry, reason: str, detail: str = "") -> None:
        """Remove a sandbox its caller has taken out of ``_entries`` (so this runs once per
        entry, which gives back its slot), recording why it ended."""
        entry.closing = True
        if self.journal is not None:
            self.journal.ended(entry, reason, detail)
        self.quota.release(entry.tenant, paused=entry.parked)
        if self._on_removed is not None:
            try:
                await self._on_removed(entry)
            except Exception:
                log.exception("counting the removal of sandbox %s failed", entry.id)
        if entry.processes is not None:
            entry.processes.close()
        if entry.interpreter is not None:
            entry.interpreter.close()
        close_watchers(entry)
        try:
            await entry.vm.kill()
        except CapsaError as exc:
            if entry.node_id is None:
                log.exception("killing sandbox %s failed", entry.id)
            else:  # its node ended it already (lifetime) or is gone with it (SandboxLost)
                log.info("sandbox %s on node %s: %s", entry.id, entry.node_id[:12], exc.message)
        except Exception:
            log.exception("killing sandbox %s failed", entry.id)
        if entry.paused is not None:
            shutil.rmtree(entry.paused, ignore_errors=True)
        log.info("sandbox %s removed", entry.id)

    async def _reap(self) -> None:
        """Forget sandboxes whose lifetime ended (capsa already stopped their VM) or that died."""
        probed = time.monotonic()
        while True:
            await asyncio.sleep(_REAP_INTERVAL)
            self._pause_due()
            ended: dict[int, _cluster.Ended] = {}
            if self.ray_address is not None and time.monotonic() - probed >= _PROBE_INTERVAL:
                probed = time.monotonic()
                live = [e.vm for e in self._entries.values() if e.paused is None and not e.closing]
                ended = await _cluster.probe(live, _PROBE_TIMEOUT)
            for entry in list(self._entries.values()):
                end = ended.get(id(entry.vm))
                gone = end is not None or entry.vm.status is not RunState.RUNNING
                if entry.paused is None and not entry.pausing and gone:
                    self._entries.pop(entry.id, None)
                    reason, detail = ("node_lost", end.lost) if end and end.lost else end_of(entry)
                    log.info("sandbox %s ended (%s)", entry.id, reason)
                    await self._destroy(entry, reason, detail)

    async def close(self) -> None:
        """Stop everything: pools, sandboxes, background tasks."""
        self.closed = True
        started = time.monotonic()
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        if self.journal is not None:  # an upgrade loses no sandbox: the running ones pause
            await pause_all(self.list(), self._pause_for_shutdown, self.shutdown_timeout)
        entries = [e for e in self._entries.values() if self.journal is None or e.paused is None]
        self._entries.clear()
        await asyncio.gather(*(self._destroy(e, "server_shutdown") for e in entries),
                             return_exceptions=True)  # fmt: skip
        self._warm_wanted.set()
        while self._warm:
            vm, _ = self._warm.popleft()
            with contextlib.suppress(Exception):
                await vm.kill()
        await asyncio.gather(*(p.close() for p in self._pools.values()), return_exceptions=True)
        if self.ray_address is not None:
            await _cluster.close()
        await self._tasks.wait_all(10.0)
        if self._paused_root is not None and self.journal is None:
            shutil.rmtree(self._paused_root, ignore_errors=True)
        self.snapshots.close()
        log.info("stopped %d sandboxes in %.1fs", len(entries), time.monotonic() - started)
