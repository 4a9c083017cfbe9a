"""The server's pauses and resumes of its sandboxes (E2B's pause/resume, on_timeout='pause', the
shutdown's pause), and the saves and restores behind forks and named snapshots.

A mixin of :class:`capsa.server.registry.Registry`, kept apart because it is the one concern of
the registry that moves a sandbox between running and paused: it declares the registry state it
works on, and the few registry methods it calls are abstract here."""

from __future__ import annotations

import abc
import datetime
import logging
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import capsa
from capsa._tasks import TaskSet
from capsa.errors import CapsaError
from capsa.server.carry import Carried, holding
from capsa.server.entry import (
    DEFAULT_TIMEOUT,
    ApiError,
    Entry,
    SandboxPaused,
    close_watchers,
    now,
)
from capsa.server.quota import LimitReached, Quota
from capsa.server.saves import build_from, detach, forget_processes, reattach, save_files_of

if TYPE_CHECKING:
    from capsa.net.secrets import Secret
    from capsa.server.durable import Journal
    from capsa.server.server_secrets import ServerSecrets

log = logging.getLogger(__name__)

# Seconds a pause or snapshot waits for the agent's requests in flight (a page's process list, an
# SDK's file read) to end: a snapshot refuses a busy agent, and those end in well under this.
IDLE_WAIT = 15.0


class Pausing(abc.ABC):
    """Pause, resume, save and restore, over the registry's entries and slots."""

    quota: Quota
    journal: Journal | None
    memory_mb: int
    closed: bool
    _entries: dict[str, Entry]
    _tasks: TaskSet
    _paused_root: Path | None
    _on_paused: Callable[[Entry], Awaitable[None]] | None
    secrets: ServerSecrets

    @abc.abstractmethod
    def find(self, sandbox_id: str, tenant: str | None = None) -> Entry: ...

    @abc.abstractmethod
    def builder(
        self, template: str, policy: capsa.NetworkPolicy | None = None, secrets: tuple[Secret, ...] = ()
    ) -> capsa.SandboxBuilder: ...

    def secrets_of(self, entry: Entry) -> tuple[Secret, ...]:
        """The secrets ``entry`` is built with: the operator's it was given (their values from the
        server's configuration now) and its header transforms (gone after a server restart)."""
        return self.secrets.resolve(entry.secret_names, entry.id) + entry.transforms

    @abc.abstractmethod
    async def kill(self, sandbox_id: str, tenant: str | None = None) -> None: ...

    @abc.abstractmethod
    async def _destroy(self, entry: Entry, reason: str, detail: str = "") -> None: ...

    # -- pause / resume (capsa snapshots) --

    async def pause(self, sandbox_id: str, tenant: str | None = None, *, memory: bool = True) -> None:
        """Save the sandbox's memory and files to a snapshot and free its VM. Commands still
        running and the code interpreter's process are kept (frozen with the guest, taken up again
        on resume); clients streaming a command's output are told to connect again. Without
        ``memory`` only the files are kept: the commands end, and the resume boots afresh."""
        entry = self.find(sandbox_id, tenant)
        if entry.node_id is not None:
            raise ApiError(
                501,
                "pause is not supported by capsa serve --ray: the snapshot would stay on the "
                f"sandbox's Ray node ({entry.node_id[:12]}) and tie its resume to that node",
                hint="keep the sandbox running (set_timeout extends it), or serve without --ray",
            )
        async with entry.resume_lock:  # not while a resume (or another pause) is under way
            if entry.closing:
                raise ApiError(404, f"sandbox {sandbox_id!r} not found")
            if entry.paused is not None:
                raise ApiError(409, f"sandbox {sandbox_id!r} is already paused")
            await self._pause(entry, memory)

    @property
    def files_max_bytes(self) -> int:
        """The most a filesystem-only save takes from a guest: its changed files live in its RAM
        (a tmpfs), so an honest archive of them is smaller than that."""
        return max(self.memory_mb, 64) << 20

    async def _pause(self, entry: Entry, memory: bool = True, *, force: bool = False) -> None:
        """Pause ``entry`` (its ``resume_lock`` held). Its running slot becomes a paused one first
        (429 when those are all taken, unless ``force``: a shutdown's pause); a failed pause gives
        it back and leaves nothing behind. With a state dir the pause counts once its row is
        committed, after the snapshot is complete (a crash before leaves files the next start
        removes)."""
        if not memory and any(disk.volume for disk in entry.vm.config.disks):
            raise ApiError(
                409,
                f"sandbox {entry.id!r} mounts volumes: it pauses with its memory only",
                hint="a filesystem-only pause boots afresh on resume, without its volumes mounted",
            )
        try:
            self.quota.park(force=force)
        except LimitReached as exc:
            message = f"cannot pause sandbox {entry.id!r}: {exc.message}"
            raise ApiError(429, message, hint=exc.hint) from None
        entry.parked = entry.pausing = True
        started = time.monotonic()
        if self._paused_root is None:
            self._paused_root = Path(tempfile.mkdtemp(prefix="capsa-serve-paused-"))
        target = self._paused_root / entry.id
        try:
            if memory:
                await detach(entry)
                close_watchers(entry)
                await entry.vm.agent.wait_idle(IDLE_WAIT)  # a page's or client's request ends
                await entry.vm.snapshot(target, resume=False)  # nothing runs past it (volumes)
            else:  # the guest runs on meanwhile: nothing to detach
                await save_files_of(entry, target, self.files_max_bytes)
                close_watchers(entry)
            if self.journal is not None and not entry.closing:
                self.journal.paused(entry, target)
        except BaseException as exc:
            entry.pausing = False
            shutil.rmtree(target, ignore_errors=True)
            if not entry.closing and memory:
                await reattach(entry, entry.vm)  # the same VM: its handles work on
            if not entry.closing:  # else its removal gave the paused slot back already
                self.quota.unpark(force=True)
                entry.parked = False
            if isinstance(exc, CapsaError) and not isinstance(exc, ApiError):
                # a full disk is a 507: the SDKs read a 409 as "already paused" and report success
                status = 507 if "No space left" in exc.message else 409
                raise ApiError(status, f"cannot pause sandbox {entry.id!r}: {exc.message}") from None
            raise
        entry.pausing = False
        if entry.closing:  # killed while its snapshot was being saved
            shutil.rmtree(target, ignore_errors=True)
            raise ApiError(404, f"sandbox {entry.id!r} not found")
        entry.paused, entry.paused_memory = target, memory
        if self._on_paused is not None:
            await self._on_paused(entry)
        if not memory:
            forget_processes(entry)
        await entry.vm.kill()
        log.info("sandbox %s paused to %s in %.2fs", entry.id, target, time.monotonic() - started)

    async def resume(
        self, sandbox_id: str, timeout: int | None, tenant: str | None = None, *, memory: bool = True
    ) -> Entry:
        """Restore a paused sandbox, if a running slot is free (429 if not). Concurrent resumes of
        one sandbox wait for the first, which builds the one VM: each building its own would leave
        all but the last running, untracked and uncounted. A filesystem-only pause boots afresh;
        ``memory=False`` (E2B's ``on_resume="reboot"``) asks for that, which a memory pause cannot
        give (501: it is never turned into a memory restore)."""
        entry = self.find(sandbox_id, tenant)
        async with entry.resume_lock:
            if entry.closing:  # killed while this one waited
                raise ApiError(404, f"sandbox {sandbox_id!r} not found")
            if entry.paused is None:  # running, or resumed by the resume this one waited for
                # as in E2B, connecting to a running sandbox extends its timeout, never shortens it
                if timeout is not None and now() + datetime.timedelta(seconds=timeout) > entry.end_at:
                    await entry.set_timeout(timeout)
                return entry
            if not memory and entry.paused_memory:
                raise ApiError(
                    501,
                    f"sandbox {sandbox_id!r} was paused with its memory; capsa serve cannot boot "
                    "it afresh from its files alone (on_resume='reboot')",
                    hint="resume it with on_resume='restore' (the default)",
                )
            try:
                self.quota.unpark()
            except LimitReached as exc:
                raise ApiError(429, f"cannot resume sandbox {sandbox_id!r}: {exc.message}",
                               hint=exc.hint) from None  # fmt: skip
            entry.parked = False
            try:
                builder = self.builder(entry.template, entry.policy, self.secrets_of(entry))
                vm = await build_from(builder, entry.paused)
            except BaseException:
                if not entry.closing:  # still paused: back to its paused slot
                    self.quota.park(force=True)
                    entry.parked = True
                raise
            if entry.closing:  # killed while it was being restored
                await vm.kill()
                raise ApiError(404, f"sandbox {sandbox_id!r} not found")
            try:
                if self.journal is not None:  # its row first: a crash now leaves files, not a row
                    self.journal.running(entry)
            except ApiError:  # not recorded: it stays paused
                await vm.kill()
                self.quota.park(force=True)
                entry.parked = True
                raise
            entry.vm = vm
            shutil.rmtree(entry.paused, ignore_errors=True)
            entry.paused = None
            entry.resume_on_call = False
            await reattach(entry, vm)
            if self.journal is not None:
                await self.journal.take_up(entry)
            await entry.set_timeout(timeout or DEFAULT_TIMEOUT)
        log.info("sandbox %s resumed", entry.id)
        return entry

    # -- saves and restores for fork and create_snapshot --

    async def save(self, entry: Entry, target: Path, *, memory: bool = True) -> Carried:
        """Snapshot the running ``entry`` to ``target``; it keeps running, with its id, end,
        commands and interpreter (the snapshot holds copies of the processes too, described by
        the :class:`Carried` returned, for the sandboxes restored from it; without ``memory``,
        only the files, and nothing is carried)."""
        if entry.node_id is not None:
            raise ApiError(
                501,
                "snapshots and forks are not supported by capsa serve --ray: the snapshot would "
                f"stay on the sandbox's Ray node ({entry.node_id[:12]})",
                hint="serve without --ray",
            )
        async with entry.resume_lock:  # one save or resume of a sandbox at a time
            if not entry.running:
                state = "paused" if entry.paused is not None else "not running"
                raise ApiError(409, f"sandbox {entry.id!r} is {state}", hint="resume it first")
            if not memory:
                await save_files_of(entry, target, self.files_max_bytes)
                return Carried()
            close_watchers(entry)  # commands and the interpreter keep running: a snapshot keeps them
            try:
                async with holding(entry) as carried:
                    await entry.vm.agent.wait_idle(IDLE_WAIT)
                    await entry.vm.snapshot(target)
            except CapsaError as exc:
                raise ApiError(409, f"cannot snapshot sandbox {entry.id!r}: {exc.message}") from None
            return carried

    async def restore(
        self,
        snapshot: Path,
        *,
        template: str,
        timeout: int,
        tenant: str,
        metadata: dict[str, str],
        envs: dict[str, str],
        policy: capsa.NetworkPolicy | None,
        reserved: bool = False,
        secret_names: tuple[str, ...] = (),
        transforms: tuple[Secret, ...] = (),
    ) -> Entry:
        """A new sandbox of ``tenant`` restored from ``snapshot`` (which it does not need once
        started). Like :meth:`create`, it takes its slot before the first ``await``, unless the
        caller ``reserved`` it (a fork takes all its slots at once); either way the slot is the
        new entry's, or given back if the restore fails. ``secret_names`` and ``transforms``: the
        source's (its restores get them too, with a CA and placeholders of their own)."""
        if not reserved:
            try:
                self.quota.reserve(tenant)
            except LimitReached as exc:
                raise ApiError(429, exc.message, hint=exc.hint) from None
        try:
            if self.closed:
                raise ApiError(503, "the server is shutting down")
            secrets = self.secrets.resolve(secret_names) + transforms
            vm = await build_from(self.builder(template, policy, secrets), snapshot)
        except BaseException:
            self.quota.release(tenant)
            raise
        entry = Entry.start(
            vm,
            template=template,
            metadata=metadata,
            envs=envs,
            memory_mb=self.memory_mb,
            tenant=tenant,
            policy=policy,
            secret_names=secret_names,
            transforms=transforms,
        )
        self._entries[entry.id] = entry  # the slot is the entry's now: _destroy gives it back
        try:
            if self.journal is not None:
                self.journal.running(entry)
            await entry.set_timeout(timeout)
        except BaseException:
            await self.kill(entry.id)
            raise
        if self.closed:
            await self.kill(entry.id)
            raise ApiError(503, "the server is shutting down")
        log.info("sandbox %s restored from %s (tenant %s)", entry.id, snapshot, tenant)
        return entry

    async def awake(self, sandbox_id: str, tenant: str | None = None) -> Entry:
        """The sandbox a call is for, running: a paused one with ``auto_resume`` is resumed first
        (for its last timeout again; concurrent calls share the one resume), one without raises
        :class:`SandboxPaused`. Unknown ids (and other tenants') are a 404."""
        entry = self.find(sandbox_id, tenant)
        if entry.running:
            return entry
        if not entry.paused_memory or not (entry.auto_resume or entry.resume_on_call):
            raise SandboxPaused(entry.id)  # a filesystem-only pause's new boot is no transparent wake
        return await self.resume(sandbox_id, entry.timeout, tenant)

    def _pause_due(self) -> None:
        """Start the pause of each ``auto_pause`` sandbox whose timeout has come."""
        moment = now()
        for entry in self._entries.values():
            due = entry.auto_pause and entry.running and entry.end_at <= moment
            if due and "timeout_pause" not in entry.extra:
                entry.extra["timeout_pause"] = True
                self._tasks.spawn(self._pause_at_timeout(entry), name="capsa-server-auto-pause")

    async def _pause_at_timeout(self, entry: Entry) -> None:
        """E2B's ``on_timeout="pause"``. If the pause fails, the timeout ends the sandbox as a
        plain one's would: it is removed."""
        try:
            async with entry.resume_lock:
                if entry.closing or entry.paused is not None or entry.end_at > now():
                    return  # removed, paused, or given a new timeout meanwhile
                await self._pause(entry, entry.pause_memory)
            log.info("sandbox %s paused at its timeout", entry.id)
        except Exception as exc:
            message = exc.message if isinstance(exc, CapsaError) else repr(exc)
            log.warning("sandbox %s: pausing it at its timeout failed (%s); removing it", entry.id,
                        message)  # fmt: skip
            if self._entries.get(entry.id) is entry:
                self._entries.pop(entry.id)
                await self._destroy(entry, "host_error", f"pausing it at its timeout failed: {message}")
        finally:
            entry.extra.pop("timeout_pause", None)

    async def _pause_for_shutdown(self, entry: Entry) -> None:
        async with entry.resume_lock:
            if entry.running:
                entry.resume_on_call = True  # resumed by its next call after the restart
                await self._pause(entry, force=True)
