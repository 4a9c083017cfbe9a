"""The server's volumes: per tenant, in ``<state-dir>/volumes/<tenant>/``, each with an id and a
content token that survive a restart.

A volume is used by one thing at a time, and the server keeps it so:
- a sandbox created with it (``volumeMounts``) holds it from creation until it is killed, paused
  included (a paused sandbox's kernel still has the filesystem mounted in its saved memory), and
  across a restart: the hold is written beside the volume (``<name>.holder``: the sandbox's id and
  mount path) and read back at the next start, where it holds for as long as the state dir still
  keeps that sandbox (paused); a hold whose sandbox is gone (killed, or ended by a crash) lapses;
- the content API works through a helper sandbox (:class:`capsa.sandbox.volume_files.VolumeFiles`) that
  is started on the first content call and stopped after ``HELPER_IDLE`` seconds without one, or
  at once when a sandbox is created with the volume;
- while a running sandbox mounts the volume, content calls go through that sandbox's agent
  (:class:`capsa.server.volume_mounted.MountedFiles`): its kernel is the volume's one writer;
- content calls while a paused sandbox holds the volume, and destroy while any sandbox does,
  answer 409 (a paused guest's saved memory has the filesystem mounted: nothing may change it)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from capsa.errors import VolumeError
from capsa.sandbox import Sandbox
from capsa.sandbox.volume_files import VolumeFiles
from capsa.server.entry import ApiError
from capsa.server.volume_mounted import MountedFiles
from capsa.volume.names import check_name
from capsa.volume.spec import serial
from capsa.volume.store import Volume, VolumeStore

log = logging.getLogger(__name__)

HELPER_IDLE = 30.0  # seconds a content helper stays up after its last call
_TOKEN_SUFFIX = ".token"
_HOLDER_SUFFIX = ".holder"
_UPLOAD_PREFIX = ".capsa-upload-"  # capsa.sandbox.volume_files' temporary name of a write


@dataclass
class VolumeRecord:
    tenant: str
    volume: Volume
    id: str
    token: str = field(repr=False)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False, compare=False)

    @property
    def name(self) -> str:
        return self.volume.name


def volume_id(tenant: str, name: str) -> str:
    """Stable across restarts and unique per (tenant, name); reveals neither."""
    return "vol-" + hashlib.sha256(f"{tenant}\0{name}".encode()).hexdigest()[:24]


class ServerVolumes:
    def __init__(
        self,
        root: Path,
        size_mb: int,
        alive: Callable[[str], bool],
        running: Callable[[str], Sandbox | None] | None = None,
    ) -> None:
        """``alive(sandbox_id)``: whether that sandbox still exists (running or paused);
        ``running(sandbox_id)``: its VM while it runs (None when paused or gone). Without
        ``running``, content calls on a mounted volume answer 409."""
        self.root = root
        self.size_mb = size_mb
        self._alive = alive
        self._running = running
        self._records: dict[str, VolumeRecord] = {}
        self._holders: dict[str, str] = {}  # volume id -> sandbox id
        self._mounts: dict[str, list[dict[str, str]]] = {}  # sandbox id -> its volumeMounts
        self._helpers: dict[str, tuple[VolumeFiles, float]] = {}
        self._swept: set[str] = set()  # volumes whose crash leftovers this run has removed
        self._reaper: asyncio.Task[None] | None = None

    # -- records --

    def load(self) -> None:
        """Find the volumes a previous run left (ids are derived, tokens were saved)."""
        if not self.root.is_dir():
            return
        for tenant_dir in sorted(self.root.iterdir()):
            if not tenant_dir.is_dir():
                continue
            for volume in VolumeStore(tenant_dir).list():
                self._adopt_holder(self._remember(tenant_dir.name, volume))

    def _adopt_holder(self, record: VolumeRecord) -> None:
        """The hold a previous run left on ``record`` (its sandbox may be paused in the state
        dir: :meth:`_check_free` lets the hold lapse once that sandbox is gone)."""
        path = _holder_file(record)
        try:
            held = json.loads(path.read_text())
            sandbox_id, guest_path = str(held["sandbox"]), str(held["path"])
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("volume %s: ignoring its unreadable hold record %s (%s)", record.name, path, exc)
            path.unlink(missing_ok=True)
            return
        self._holders[record.id] = sandbox_id
        self._mounts.setdefault(sandbox_id, []).append({"name": record.name, "path": guest_path})

    def _remember(self, tenant: str, volume: Volume) -> VolumeRecord:
        token_file = volume.path.with_suffix(_TOKEN_SUFFIX)
        try:
            token = token_file.read_text().strip()
        except FileNotFoundError:
            token = ""
        if not token:
            token = secrets.token_urlsafe(32)
            fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(token)
        record = VolumeRecord(tenant, volume, volume_id(tenant, volume.name), token)
        self._records[record.id] = record
        return record

    def _store(self, tenant: str) -> VolumeStore:
        return VolumeStore(self.root / tenant)  # tenant names are checked (tenants.py): a segment

    def create(self, tenant: str, name: object) -> VolumeRecord:
        try:
            checked = check_name(name)
        except VolumeError as exc:
            raise ApiError(400, exc.message, hint=exc.hint) from None
        if volume_id(tenant, checked) in self._records:
            raise ApiError(409, f"volume {checked!r} already exists")
        try:
            volume = self._store(tenant).create(checked, self.size_mb)
        except FileExistsError:
            raise ApiError(409, f"volume {checked!r} already exists") from None
        except VolumeError as exc:
            raise ApiError(500, exc.message, hint=exc.hint) from None
        return self._remember(tenant, volume)

    def in_scope(self, scope: str | None) -> list[VolumeRecord]:
        return [r for r in self._records.values() if scope is None or r.tenant == scope]

    def find(self, volume_id_: str, scope: str | None) -> VolumeRecord:
        record = self._records.get(volume_id_)
        if record is None or (scope is not None and record.tenant != scope):
            raise ApiError(404, f"volume {volume_id_!r} not found")
        return record

    def find_by_name(self, tenant: str, name: object) -> VolumeRecord:
        if not isinstance(name, str):
            raise ApiError(400, "a volume mount's name must be a string")
        record = self._records.get(volume_id(tenant, name))
        if record is None:
            raise ApiError(404, f"volume {name!r:.80} not found")
        return record

    def authorized(self, volume_id_: str, token: str | None) -> VolumeRecord | None:
        """The volume a content call may touch: its id and its own token (constant time)."""
        record = self._records.get(volume_id_)
        expected = record.token if record is not None else secrets.token_urlsafe(32)
        ok = token is not None and hmac.compare_digest(expected.encode(), token.encode())
        return record if ok and record is not None else None

    async def destroy(self, record: VolumeRecord) -> None:
        async with record.lock:
            self._check_free(record)
            await self._stop_helper(record)
            try:
                self._store(record.tenant).remove(record.name)
            except VolumeError as exc:
                raise ApiError(409, exc.message, hint=exc.hint) from None
            record.volume.path.with_suffix(_TOKEN_SUFFIX).unlink(missing_ok=True)
            _holder_file(record).unlink(missing_ok=True)
            self._records.pop(record.id, None)

    # -- holders: sandboxes that mount a volume --

    def _check_free(self, record: VolumeRecord) -> None:
        holder = self._holders.get(record.id)
        if holder is not None and self._alive(holder):
            raise ApiError(
                409,
                f"volume {record.name!r} is mounted by sandbox {holder}",
                hint="kill the sandbox first (a paused one holds its volumes too); while it runs, "
                "use the sandbox's own filesystem API at the mount path",
            )
        if self._holders.pop(record.id, None) is not None:
            _holder_file(record).unlink(missing_ok=True)

    @contextlib.asynccontextmanager
    async def mounting(
        self, mounts: list[tuple[VolumeRecord, str]]
    ) -> AsyncIterator[Callable[[str], None]]:
        """Around a sandbox's creation with ``mounts`` (volume, guest path): checks each volume is
        free, stops its helper, and yields ``hold(sandbox_id)`` to call once the sandbox exists."""
        async with contextlib.AsyncExitStack() as stack:
            for record, _ in sorted(mounts, key=lambda m: m[0].id):  # one order: no deadlock
                await stack.enter_async_context(record.lock)
                self._check_free(record)
                await self._stop_helper(record)

            def hold(sandbox_id: str) -> None:
                for record, path in mounts:
                    self._holders[record.id] = sandbox_id
                    _write_holder(record, sandbox_id, path)
                self._mounts[sandbox_id] = [{"name": r.name, "path": p} for r, p in mounts]

            yield hold

    def mounts_json(self, sandbox_id: str) -> list[dict[str, str]]:
        """E2B's ``volumeMounts`` of a sandbox (forgotten once it is gone)."""
        for gone in [s for s in self._mounts if not self._alive(s)]:
            del self._mounts[gone]
        return self._mounts.get(sandbox_id, [])

    def holder(self, record: VolumeRecord) -> str | None:
        """The sandbox (running or paused) that mounts ``record``, if one does."""
        holder = self._holders.get(record.id)
        return holder if holder is not None and self._alive(holder) else None

    # -- content helpers --

    @contextlib.asynccontextmanager
    async def files(self, record: VolumeRecord) -> AsyncIterator[VolumeFiles | MountedFiles]:
        async with record.lock:
            holder = self.holder(record)
            if holder is not None:
                yield self._through(record, holder)
                return
            self._check_free(record)
            helper = self._helpers.get(record.id)
            if helper is None or not helper[0].running:
                files = VolumeFiles(record.volume)
                try:
                    await files.start()
                except VolumeError as exc:
                    raise ApiError(409, exc.message, hint=exc.hint) from None
                helper = (files, time.monotonic())
                if record.id not in self._swept:
                    self._swept.add(record.id)
                    await _sweep_uploads(record, files)
            self._helpers[record.id] = (helper[0], time.monotonic())
            self._start_reaper()
            yield helper[0]
            self._helpers[record.id] = (helper[0], time.monotonic())

    def _through(self, record: VolumeRecord, holder: str) -> MountedFiles:
        """The content calls of ``record`` through the running sandbox ``holder`` that mounts it;
        409 when that sandbox is paused (its saved memory has the filesystem mounted)."""
        vm = self._running(holder) if self._running is not None else None
        mounts = self._mounts.get(holder, [])
        index = next((i for i, m in enumerate(mounts) if m["name"] == record.name), None)
        if vm is None or index is None:
            raise ApiError(
                409,
                f"volume {record.name!r} is mounted by the paused sandbox {holder}",
                hint="resume the sandbox (its content calls then go through it), or kill it",
            )
        path = mounts[index]["path"]
        return MountedFiles(vm, name=record.name, path=path, serial=serial(index))

    async def _stop_helper(self, record: VolumeRecord) -> None:
        helper = self._helpers.pop(record.id, None)
        if helper is not None:
            await helper[0].stop()

    def _start_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.create_task(self._reap())

    async def _reap(self) -> None:
        while self._helpers:
            await asyncio.sleep(min(5.0, HELPER_IDLE))
            now = time.monotonic()
            for vid, (_, used) in list(self._helpers.items()):
                record = self._records.get(vid)
                if record is not None and now - used > HELPER_IDLE and not record.lock.locked():
                    async with record.lock:
                        await self._stop_helper(record)

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        helpers, self._helpers = list(self._helpers.values()), {}
        await asyncio.gather(*(files.stop() for files, _ in helpers), return_exceptions=True)


def _holder_file(record: VolumeRecord) -> Path:
    return record.volume.path.with_suffix(_HOLDER_SUFFIX)


def _write_holder(record: VolumeRecord, sandbox_id: str, guest_path: str) -> None:
    """Record the hold for the next start (written whole, then renamed in: never half a record).
    It cannot fail the create it follows: a state dir that cannot take it is logged, and the hold
    lasts as long as this run (the VM's own lock on the image guards it while it runs)."""
    path = _holder_file(record)
    partial = path.with_name(f".{path.name}.partial")
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump({"sandbox": sandbox_id, "path": guest_path}, fh)
        os.replace(partial, path)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        log.error("volume %s: recording its hold by sandbox %s failed (%s): a restart while the "
                  "sandbox is paused would not keep the hold", record.name, sandbox_id, exc)  # fmt: skip


async def _sweep_uploads(record: VolumeRecord, files: VolumeFiles) -> None:
    """Once per volume and server run, on its first helper: remove the upload files of writes a
    crash cut short (a write goes to ``.capsa-upload-*`` beside its target and is renamed over
    it; a server killed meanwhile leaves that file, never a half-written target)."""
    try:
        entries = await files.list("/", depth=32)
    except VolumeError as exc:  # more entries than a listing returns: left as they are
        log.warning("volume %s: not swept for crash leftovers (%s)", record.name, exc.message)
        return
    for entry in entries:
        if entry["type"] == "file" and str(entry["name"]).startswith(_UPLOAD_PREFIX):
            log.info("volume %s: removing %s, left by a crash", record.name, entry["path"])
            with contextlib.suppress(VolumeError):
                await files.remove(entry["path"])
