"""The server's named snapshots (E2B's ``create_snapshot``): saved copies of a sandbox that new
sandboxes start from, kept apart from the sandbox that was saved so that they outlive it.

Each snapshot belongs to the tenant whose sandbox it was taken from; another tenant's lookups find
nothing (the same 404 as an unknown id), as for sandboxes. Snapshots cost disk (the guest's memory
and its changed files), so a tenant holds at most :data:`MAX_SNAPSHOTS`; they live in a temporary
directory of the server and are gone when it stops, unless the server has a state dir
(``--state-dir``: :mod:`capsa.server.durable`), which keeps them across restarts."""

from __future__ import annotations

import contextlib
import datetime
import logging
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import capsa

if TYPE_CHECKING:
    from capsa.net.secrets import Secret
    from capsa.server.carry import Carried

log = logging.getLogger(__name__)


class SnapshotJournal(Protocol):
    """What the store asks of the state dir (:class:`capsa.server.durable.Journal` is one): the
    store owns this interface so that it need not import the journal, which builds its records."""

    def snapshot_dir(self, raw: str) -> Path: ...
    def snapshots(self) -> list[Saved]: ...
    def keep_snapshot(self, saved: Saved) -> None: ...
    def put_snapshot(self, saved: Saved) -> None: ...
    def drop_snapshot(self, saved: Saved) -> None: ...


MAX_SNAPSHOTS = 32  # per tenant: each one holds the guest's memory on the server's disk
TAG = ":default"  # E2B's snapshot ids carry a tag; capsa keeps one build per snapshot


@dataclass(eq=False)
class Saved:
    """One snapshot: where its files are and what a sandbox made from it starts with."""

    id: str
    name: str | None
    tenant: str
    template: str  # the template of the saved sandbox (a restore keeps its image)
    source_id: str
    path: Path
    envs: dict[str, str]
    created_at: datetime.datetime
    users: int = 0  # restores reading it now: a delete removes the files after the last one
    deleted: bool = False
    policy: capsa.NetworkPolicy | None = None  # the source's: its restores keep it
    public_traffic: bool = True  # the source's allow_public_traffic (ingress): its restores keep it
    carried: Carried | None = None  # the source's processes in it: its restores take them up
    mask_request_host: str | None = None  # the source's (ingress): its restores keep it
    secret_names: tuple[str, ...] = ()  # the source's operator secrets (names: stored)
    transforms: tuple[Secret, ...] = field(default=(), repr=False)  # its header rules (memory only)

    @property
    def snapshot_id(self) -> str:
        return f"{self.name or self.id}{TAG}"

    def json(self) -> dict[str, object]:
        return {"snapshotID": self.snapshot_id, "names": [self.snapshot_id] if self.name else []}


class SnapshotStore:
    """The snapshots of one server, per tenant."""

    def __init__(
        self, max_per_tenant: int = MAX_SNAPSHOTS, *, journal: SnapshotJournal | None = None
    ) -> None:
        self.max_per_tenant = max_per_tenant
        self._journal = journal
        self._saved: dict[str, Saved] = {}  # by raw id, oldest first
        self._root: Path | None = None
        self._pending: dict[str, int] = {}  # per tenant: snapshots being written now

    def new_path(self) -> tuple[str, Path]:
        """A fresh id and the (not yet existing) directory its snapshot is written to."""
        raw = f"s{secrets.token_hex(10)}"
        if self._journal is not None:  # a temporary name, renamed by add()
            return raw, self._journal.snapshot_dir(raw)
        if self._root is None:
            self._root = Path(tempfile.mkdtemp(prefix="capsa-serve-snapshots-"))
        return raw, self._root / raw

    def load(self) -> None:
        """The snapshots the state dir kept (at start)."""
        if self._journal is not None:
            for saved in self._journal.snapshots():
                self._saved[saved.id] = saved

    @contextlib.contextmanager
    def reserving(self, tenant: str) -> Iterator[bool]:
        """Whether one more snapshot of ``tenant`` fits, holding its place while it is written
        (check and take in one synchronous step: concurrent requests cannot pass the cap together)."""
        held = sum(1 for s in self._saved.values() if s.tenant == tenant) + self._pending.get(tenant, 0)
        if held >= self.max_per_tenant:
            yield False
            return
        self._pending[tenant] = self._pending.get(tenant, 0) + 1
        try:
            yield True
        finally:
            self._pending[tenant] -= 1

    def add(self, saved: Saved) -> None:
        """A complete snapshot: with a state dir, committed (renamed, then its row) first."""
        if self._journal is not None:
            self._journal.keep_snapshot(saved)
        if saved.name is not None:  # the name moves to the newest snapshot, as E2B's new build
            for old in self._saved.values():
                if old.tenant == saved.tenant and old.name == saved.name:
                    old.name = None
                    if self._journal is not None:
                        self._journal.put_snapshot(old)
        self._saved[saved.id] = saved
        log.info(
            "snapshot %s saved from sandbox %s (tenant %s)", saved.id, saved.source_id, saved.tenant
        )

    def find(self, ref: str, scope: str | None) -> Saved | None:
        """The snapshot ``ref`` (its id or name, with or without the tag) that a caller seeing
        ``scope`` (None: every tenant) may use, or None."""
        key = ref.removesuffix(TAG)
        found = self._saved.get(key)
        if found is not None and _sees(scope, found):
            return found
        return next((s for s in self._saved.values() if s.name == key and _sees(scope, s)), None)

    def list(
        self, scope: str | None, source_id: str | None = None, name: str | None = None
    ) -> list[Saved]:
        saved = [s for s in self._saved.values() if _sees(scope, s)]
        if source_id is not None:
            saved = [s for s in saved if s.source_id == source_id]
        if name is not None:
            saved = [s for s in saved if name.removesuffix(TAG) in (s.id, s.name)]
        return saved

    @contextlib.contextmanager
    def using(self, saved: Saved) -> Iterator[Path]:
        """The snapshot's directory, kept on disk until the caller is done with it even if the
        snapshot is deleted meanwhile."""
        saved.users += 1
        try:
            yield saved.path
        finally:
            saved.users -= 1
            if saved.deleted and saved.users == 0:
                shutil.rmtree(saved.path, ignore_errors=True)

    def delete(self, ref: str, scope: str | None) -> bool:
        saved = self.find(ref, scope)
        if saved is None:
            return False
        if self._journal is not None:  # the row before the files: a crash leaves only files
            self._journal.drop_snapshot(saved)
        del self._saved[saved.id]
        saved.deleted = True
        if saved.users == 0:
            shutil.rmtree(saved.path, ignore_errors=True)
        log.info("snapshot %s deleted", saved.id)
        return True

    def close(self) -> None:
        self._saved.clear()
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)


def _sees(scope: str | None, saved: Saved) -> bool:
    return scope is None or saved.tenant == scope
