"""The state directory of ``capsa serve`` (``--state-dir``): a lock, a SQLite database and the
files its records point at.

Layout::

    DIR/lock          flock()ed by the one server using DIR, holds its pid
    DIR/state.db      SQLite (WAL): sandboxes, snapshots, ends, meta(schema_version)
    DIR/paused/ID     the snapshot of paused sandbox ID
    DIR/snapshots/ID  named snapshot ID (written as ID.partial, renamed, then its row committed)

A row is committed only after its files are complete, and a row is deleted before its files: a
crash at any point leaves at worst files without a row, which the next start removes
(:meth:`StateDB.sweep`). Every statement is a few small rows on an indexed table: they run on the
event loop (well under a millisecond each) rather than paying a thread hop.

Refusals are :class:`~capsa.errors.ConfigError`: a database from a newer capsa, a database SQLite
cannot read (corrupt, truncated), a directory another server holds. Never an empty start over
records that exist."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from capsa.errors import ConfigError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
DB_NAME = "state.db"
LOCK_NAME = "lock"
PAUSED = "paused"
SNAPSHOTS = "snapshots"
PARTIAL = ".partial"  # a snapshot being written: never listed, removed at the next start
_BUSY_TIMEOUT = 5.0  # seconds; only `capsa serve ends` reads beside the server

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sandboxes (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, template TEXT NOT NULL,
    state TEXT NOT NULL, dir TEXT, record TEXT NOT NULL, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS snapshots (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, dir TEXT NOT NULL, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS ends (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, template TEXT NOT NULL, reason TEXT NOT NULL,
    detail TEXT NOT NULL, started REAL NOT NULL, ended REAL NOT NULL, metadata TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS ends_by_time ON ends (ended);
"""


def default_state_dir() -> Path:
    """``$XDG_STATE_HOME/capsa/serve``, else ``~/.local/state/capsa/serve``."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "capsa" / "serve"


def _corrupt(path: Path, exc: Exception) -> ConfigError:
    return ConfigError(
        f"the state database {path} cannot be read ({exc}): it is corrupt or truncated; "
        "capsa serve will not start over it empty",
        hint=f"to salvage it: sqlite3 {path} .recover | sqlite3 {path}.recovered, then move "
        f"{path.name}.recovered over {path.name} (and remove {path.name}-wal and -shm); to "
        f"give its sandboxes and snapshots up: move {path.name}, {path.name}-wal and -shm "
        "aside (the next start removes the files no record points at)",
    )


class StateLock:
    """The one-server-per-directory lock: an ``flock`` the kernel drops when the holder dies
    (``kill -9`` included), so a stale lock file never blocks a restart."""

    def __init__(self, root: Path) -> None:
        path = root / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(
                f"the state dir {root} is in use by another capsa serve (pid {holder})",
                hint="stop that server first, or give this one another --state-dir",
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def connect(path: Path, *, create: bool) -> sqlite3.Connection:
    """The database at ``path``, checked: readable, and of a schema this capsa knows."""
    if not create and not path.exists():
        raise ConfigError(f"no state database at {path}", hint="give the server's --state-dir")
    try:
        db = sqlite3.connect(path, timeout=_BUSY_TIMEOUT, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise _corrupt(path, exc) from None
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # WAL: a process crash loses no commit
        verdict = db.execute("PRAGMA quick_check").fetchone()
        if verdict is None or verdict[0] != "ok":
            raise sqlite3.DatabaseError(str(verdict[0] if verdict else "no answer"))
        row = None
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "meta" in tables:
            row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        elif tables:
            raise sqlite3.DatabaseError("tables but no schema version")
    except sqlite3.Error as exc:
        db.close()
        raise _corrupt(path, exc) from None
    version = int(row[0]) if row is not None and str(row[0]).isdigit() else None
    if version is not None and version > SCHEMA_VERSION:
        db.close()
        raise ConfigError(
            f"the state dir {path.parent} was written by a newer capsa (schema {version}; this "
            f"capsa knows up to {SCHEMA_VERSION})",
            hint="run the newer capsa on it, or start this one with another --state-dir",
        )
    if create:
        with _transaction(db):
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
    return db


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


class StateDB:
    """The records of one server. Records are JSON objects built and read by
    :mod:`capsa.server.durable`; this class only stores them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        try:
            root.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise ConfigError(f"cannot create the state dir {root}: {exc.strerror}") from None
        if root.stat().st_uid != os.getuid():  # its tokens and guest memory are this user's alone
            raise ConfigError(
                f"the state dir {root} belongs to another user",
                hint="give a --state-dir of your own",
            )
        root.chmod(0o700)
        self.lock = StateLock(root)
        try:
            self.db = connect(root / DB_NAME, create=True)
            os.chmod(root / DB_NAME, 0o600)  # it holds the sandboxes' access tokens
        except BaseException:
            self.lock.release()
            raise
        self.paused_root = root / PAUSED
        self.snapshots_root = root / SNAPSHOTS
        for path in (self.paused_root, self.snapshots_root):
            path.mkdir(mode=0o700, exist_ok=True)

    def close(self) -> None:
        self.db.close()
        self.lock.release()

    # -- sandboxes --

    def put_sandbox(
        self, sandbox_id: str, *, state: str, directory: Path | None, record: dict[str, Any]
    ) -> None:
        """Insert or replace a sandbox's row (``record`` holds its tenant and template)."""
        where = None if directory is None else str(directory)
        row = (sandbox_id, record["tenant"], record["template"], state, where, json.dumps(record))
        self.db.execute(
            "INSERT OR REPLACE INTO sandboxes VALUES (?, ?, ?, ?, ?, ?, ?)", (*row, time.time())
        )

    def sandboxes(self) -> list[tuple[str, str, Path | None, dict[str, Any]]]:
        """``(id, state, dir, record)`` of every stored sandbox."""
        rows = self.db.execute("SELECT id, state, dir, record FROM sandboxes").fetchall()
        return [(r[0], r[1], None if r[2] is None else Path(r[2]), json.loads(r[3])) for r in rows]

    def end_sandbox(self, sandbox_id: str, end: dict[str, Any]) -> None:
        """Its row goes and its end record comes, in one transaction."""
        with _transaction(self.db):
            self.db.execute("DELETE FROM sandboxes WHERE id = ?", (sandbox_id,))
            self.db.execute(
                "INSERT OR REPLACE INTO ends VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    sandbox_id,
                    end["tenant"],
                    end["template"],
                    end["reason"],
                    end["detail"],
                    end["started"],
                    end["ended"],
                    json.dumps(end["metadata"]),
                ),
            )

    # -- ends --

    def ends(self, tenant: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        return query_ends(self.db, tenant, limit)

    def prune_ends(self, before: float) -> int:
        return self.db.execute("DELETE FROM ends WHERE ended < ?", (before,)).rowcount

    def end_counts(self) -> dict[str, int]:
        rows = self.db.execute("SELECT reason, count(*) FROM ends GROUP BY reason").fetchall()
        return {r[0]: int(r[1]) for r in rows}

    # -- snapshots --

    def put_snapshot(
        self, snapshot_id: str, tenant: str, directory: Path, record: dict[str, Any]
    ) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO snapshots VALUES (?, ?, ?, ?)",
            (snapshot_id, tenant, str(directory), json.dumps(record)),
        )

    def drop_snapshot(self, snapshot_id: str) -> None:
        self.db.execute("DELETE FROM snapshots WHERE id = ?", (snapshot_id,))

    def snapshots(self) -> list[tuple[str, str, Path, dict[str, Any]]]:
        """``(id, tenant, dir, record)`` of every stored snapshot, oldest first."""
        query = "SELECT id, tenant, dir, record FROM snapshots ORDER BY rowid"
        return [(r[0], r[1], Path(r[2]), json.loads(r[3])) for r in self.db.execute(query)]

    # -- start-up --

    def sweep(self) -> int:
        """Remove what no row points at: half-written snapshots, pauses whose row a crash
        never committed. Returns how many were removed."""
        kept = {d for _, _, d, _ in self.sandboxes() if d is not None}
        kept |= {d for _, _, d, _ in self.snapshots()}
        removed = 0
        for parent in (self.paused_root, self.snapshots_root):
            for child in parent.iterdir():
                if child not in kept:
                    log.info("removing %s: left by a crash (no record points at it)", child)
                    if child.is_dir() and not child.is_symlink():
                        shutil.rmtree(child, ignore_errors=True)
                    else:
                        child.unlink(missing_ok=True)
                    removed += 1
        return removed


def query_ends(db: sqlite3.Connection, tenant: str | None, limit: int) -> list[dict[str, Any]]:
    """The newest ends first (of ``tenant``; None: every tenant's)."""
    query = "SELECT id, tenant, template, reason, detail, started, ended, metadata FROM ends"
    params: tuple[Any, ...] = ()
    if tenant is not None:
        query += " WHERE tenant = ?"
        params = (tenant,)
    rows = db.execute(query + " ORDER BY ended DESC LIMIT ?", (*params, limit)).fetchall()
    keys = ("sandboxID", "tenant", "templateID", "reason", "detail", "startedAt", "endedAt")
    return [{**dict(zip(keys, r[:7], strict=True)), "metadata": json.loads(r[7])} for r in rows]


def read_ends(root: Path, tenant: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    """``capsa serve ends``: the end records of the state dir ``root``, read beside its server
    (WAL: a reader never blocks it) or with none running."""
    db = connect(root / DB_NAME, create=False)
    try:
        return query_ends(db, tenant, limit)
    finally:
        db.close()
