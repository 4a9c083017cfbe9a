"""Filesystem snapshots: what a sandbox changed in its root, without its memory.

A memory snapshot (``vm.snapshot()``) keeps everything, processes included, and costs the guest's
RAM on disk. A filesystem snapshot keeps only the files: :func:`save_files` packs the sandbox's
writable layer and :func:`restore_files` writes it into a freshly booted sandbox of the same image,
which starts with new processes and a new boot (uptime, ``boot_id``) but the files as they were.

Why the writable layer, packed through the agent: capsa's guest root is an overlay whose upper
layer is a tmpfs, so the changed files live in guest RAM, not on a host disk that could be copied.
The init binds that tmpfs at :data:`~capsa.image.sandbox.WRITABLE_LAYER` in capsa's root, and GNU
tar (in capsa's Debian root) packs its ``upper`` directory, in overlayfs's own format: a deleted
file is a 0/0 character device (a whiteout), a directory removed and made again carries
``trusted.overlay.opaque``. Packing only the upper layer costs what the sandbox changed, not the
image. (A disk-backed writable layer would make the capture a file copy, but every sandbox would
then pay a disk's writes and sync for what now stays in RAM.)

The tar comes out on the command's stdout and the host treats it as hostile: it is written to a
file within ``max_bytes`` (the command is killed past it), then read by
:class:`capsa.image.tarreader.Reader` (the build VM's capture reader: every header and member bounded
by what was written, Go's tar rules, no sparse or unknown entries) and written again by the host as
a plain tar, ``files.tar``: names are normalised and kept under the root (``..`` refused), device
nodes dropped, only the extended attributes a guest keeps for files (``user.*``, ``trusted.*``
but overlayfs's own, ``security.capability``) kept. Whiteouts and opaque directories become a list
of paths to remove first, ``removed``. Nothing from the guest is ever extracted on the host: the
snapshot only goes back into a guest, where ``tar -x`` runs as the guest's root in its own VM.

Left out of the snapshot: capsa's own files in the writable layer (the agent under
``/usr/lib/capsa``, ``/etc/hostname``, ``/etc/resolv.conf``, ``/run/capsa``), which the new guest
writes for itself. Sandboxes of a user image (``capsa.Image``) run in a root of their own, which
this does not capture yet (:class:`SnapshotError`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import posixpath
import shutil
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from capsa.errors import CapsaError, ImageError, SnapshotError
from capsa.image.sandbox import AGENT_DIR, WRITABLE_LAYER
from capsa.image.tarheader import BLK, CHR, LNK, REG
from capsa.image.tarreader import Reader

if TYPE_CHECKING:
    from capsa.sandbox.handle import Sandbox

log = logging.getLogger(__name__)

FORMAT = "capsa-files-snapshot/1"
MANIFEST = "files.json"
ARCHIVE = "files.tar"
DEFAULT_MAX_BYTES = 8 << 30  # what one capture may write (the tar of the changed files)
MAX_REMOVED = 1_000_000  # paths deleted (whiteouts, opaque directories) in one snapshot
DEFAULT_TIMEOUT = 600.0
_STDERR_TAIL = 4000
_UPPER = f"{WRITABLE_LAYER}/upper"
# capsa's own files in the writable layer: the new guest's init writes its own
_SKIP = ("run/capsa", AGENT_DIR.strip("/"), "etc/hostname", "etc/resolv.conf")
_XATTR_PREFIX = "SCHILY.xattr."
_OPAQUE = f"{_XATTR_PREFIX}trusted.overlay.opaque"
_KEPT_XATTRS = ("user.", "trusted.", "security.capability")
_PACK = [
    "tar", "--xattrs", "--xattrs-include=user.*", "--xattrs-include=trusted.*",
    "--xattrs-include=security.capability", "--format=pax", "--numeric-owner",
    "--one-file-system", "-C", _UPPER,
    *(f"--exclude=./{path}" for path in _SKIP),
    "-cf", "-", ".",
]  # fmt: skip
_UNPACK = [
    "tar", "-x", "-p", "--numeric-owner", "--xattrs", "--xattrs-include=*",
    "-C", "/", "-f", "-",
]  # fmt: skip
_REMOVE = ["xargs", "-0", "-r", "rm", "-rf", "--"]


@dataclass(frozen=True)
class FilesSnapshot:
    """A filesystem snapshot on disk: ``path`` holds :data:`ARCHIVE` and :data:`MANIFEST`."""

    path: Path
    entries: int  # in the archive
    removed: tuple[str, ...]  # guest paths (without their leading /) deleted before unpacking
    size: int  # of the archive, bytes

    @classmethod
    def open(cls, path: str | Path) -> FilesSnapshot:
        """The snapshot saved in ``path``; :class:`SnapshotError` if it is not one."""
        folder = Path(path)
        try:
            raw = json.loads((folder / MANIFEST).read_bytes())
            size = (folder / ARCHIVE).stat().st_size
        except (OSError, ValueError) as exc:
            raise SnapshotError(f"{folder} is not a filesystem snapshot: {exc}") from None
        removed = raw.get("removed") if isinstance(raw, dict) else None
        if (
            raw.get("format") != FORMAT
            or not isinstance(raw.get("entries"), int)
            or not isinstance(removed, list)
            or not all(isinstance(p, str) and _clean(p) == p and p for p in removed)
        ):
            raise SnapshotError(f"{folder} has a malformed filesystem snapshot manifest")
        return cls(folder, raw["entries"], tuple(removed), size)


def is_files_snapshot(path: str | Path) -> bool:
    """Whether ``path`` holds a filesystem snapshot (not a memory one)."""
    return (Path(path) / MANIFEST).is_file()


async def save_files(
    vm: Sandbox,
    path: str | Path,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    timeout: float = DEFAULT_TIMEOUT,
) -> FilesSnapshot:
    """Save the files ``vm`` changed (its writable layer) to the new directory ``path``. The
    sandbox keeps running; a file written during the capture may be caught half-written. At most
    ``max_bytes`` of tar are taken from the guest (else :class:`SnapshotError`, nothing left)."""
    folder = Path(path)
    await asyncio.to_thread(folder.mkdir, parents=True)
    try:
        raw = folder / "capture.tar"
        await _capture(vm, raw, max_bytes, timeout)
        try:
            snapshot = await asyncio.to_thread(_rewrite, raw, folder)
        except ImageError as exc:  # the capture reader's CaptureError: not an honest archive
            raise SnapshotError(f"the guest's archive is refused: {exc.message}") from None
        raw.unlink()
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    log.info(
        "files snapshot %s: %d entries, %d removed, %d bytes",
        folder, snapshot.entries, len(snapshot.removed), snapshot.size,
    )  # fmt: skip
    return snapshot


async def restore_files(
    vm: Sandbox, snapshot: FilesSnapshot | str | Path, *, timeout: float = DEFAULT_TIMEOUT
) -> None:
    """Write ``snapshot`` into ``vm`` (a freshly booted sandbox of the image it was saved from):
    first the removed paths go, then the archive is unpacked over the root."""
    snap = snapshot if isinstance(snapshot, FilesSnapshot) else FilesSnapshot.open(snapshot)
    try:
        async with asyncio.timeout(timeout):
            if snap.removed:
                names = b"".join(
                    f"/{p}".encode("utf-8", "surrogateescape") + b"\0" for p in snap.removed
                )
                gone = await vm.agent.exec(_REMOVE[0]).args(_REMOVE[1:]).stdin(names).run()
                if gone.exit_code != 0:
                    log.warning("restoring %s: removing paths: %s", snap.path, gone.stderr[-500:])
            await _unpack(vm, snap.path / ARCHIVE)
    except TimeoutError:
        raise SnapshotError(f"restoring the files of {snap.path} took over {timeout}s") from None
    except SnapshotError:
        raise
    except CapsaError as exc:
        raise SnapshotError(f"cannot restore the files of {snap.path}: {exc.message}") from exc


async def _unpack(vm: Sandbox, archive: Path) -> None:
    process = await vm.agent.exec(_UNPACK[0]).args(_UNPACK[1:]).spawn()
    errors = bytearray()

    async def drain(stream: Any, keep: bool) -> None:
        async for chunk in stream:
            if keep:
                errors.extend(chunk)
                del errors[:-_STDERR_TAIL]

    readers = asyncio.gather(drain(process.stdout, False), drain(process.stderr, True))
    try:
        with archive.open("rb") as fh:
            while chunk := await asyncio.to_thread(fh.read, 1 << 20):
                await process.write_stdin(chunk)
        await process.close_stdin()
        await readers
        code = await process.wait()
    except BaseException:
        readers.cancel()
        with contextlib.suppress(Exception):
            await process.kill()
        raise
    if code != 0:
        detail = errors.decode(errors="replace")
        raise SnapshotError(f"unpacking the files in the new guest failed (tar exited {code})",
                            hint=detail[-1000:] or None)  # fmt: skip


async def _capture(vm: Sandbox, target: Path, max_bytes: int, timeout: float) -> None:
    """The guest's tar of its upper layer, written to ``target`` (at most ``max_bytes``)."""
    started = time.monotonic()
    try:
        process = await vm.agent.exec(_PACK[0]).args(_PACK[1:]).spawn()
    except CapsaError as exc:
        raise SnapshotError(f"cannot pack the sandbox's files: {exc.message}") from exc
    errors = bytearray()
    written = 0

    async def errs() -> None:
        async for chunk in process.stderr:
            errors.extend(chunk)
            del errors[:-_STDERR_TAIL]

    drain = asyncio.ensure_future(errs())
    try:
        async with asyncio.timeout(timeout):
            with target.open("wb") as fh:
                async for chunk in process.stdout:
                    written += len(chunk)
                    if written > max_bytes:
                        raise SnapshotError(
                            f"the sandbox's changed files take more than {max_bytes} bytes",
                            hint="remove files the snapshot need not keep, or raise max_bytes",
                        )
                    await asyncio.to_thread(fh.write, chunk)
            await drain
            code = await process.wait()
    except TimeoutError:
        raise SnapshotError(f"packing the sandbox's files took over {timeout}s") from None
    except CapsaError as exc:
        if isinstance(exc, SnapshotError):
            raise
        raise SnapshotError(f"cannot pack the sandbox's files: {exc.message}") from exc
    finally:
        drain.cancel()
        with contextlib.suppress(Exception):
            await process.kill()
    if code not in (0, 1):  # 1: a file changed while being read
        detail = errors.decode(errors="replace")[-1000:]
        raise SnapshotError(
            f"cannot pack the sandbox's files (tar exited {code}): {detail}",
            hint="sandboxes of a user image (capsa.Image) have a root of their own, which "
            "filesystem snapshots do not capture yet",
        )
    log.debug("captured %d bytes of files in %.2fs", written, time.monotonic() - started)


def _encode(path: str) -> bytes:
    return path.encode("utf-8", "surrogateescape")


def _clean(name: str) -> str:
    """``name`` as a path under the root, without a leading or trailing ``/``."""
    return posixpath.normpath("/" + name).strip("/")


def _skipped(path: str) -> bool:
    return any(path == s or path.startswith(f"{s}/") for s in _SKIP)


def _rewrite(raw: Path, folder: Path) -> FilesSnapshot:
    """Read the guest's tar at ``raw`` as hostile bytes and write the snapshot's own files."""
    removed: list[str] = []
    files: set[str] = set()  # regular files written: what a hard link may point to
    entries = 0
    with raw.open("rb") as src, (folder / ARCHIVE).open("wb") as dst:
        reader = Reader(src, os.fstat(src.fileno()).st_size)
        with tarfile.open(fileobj=dst, mode="w", format=tarfile.PAX_FORMAT) as out:
            for member in reader:
                hard = member.type == LNK
                if ".." in member.name.split("/") or (hard and ".." in member.linkname.split("/")):
                    raise SnapshotError(
                        f"the guest's archive has an entry outside the root: {member.name[:80]!r}"
                    )
                path = _clean(member.name)
                if not path or _skipped(path) or (hard and _clean(member.linkname) not in files):
                    continue  # capsa's own, or a hard link to what was left out
                whiteout = member.type == CHR and member.devmajor == 0 and member.devminor == 0
                if whiteout or member.xattrs.get(_OPAQUE) == b"y":
                    if len(removed) >= MAX_REMOVED:
                        raise SnapshotError(f"more than {MAX_REMOVED} removed paths")
                    removed.append(path)
                if whiteout or member.type in (CHR, BLK):
                    continue  # device nodes: the guest's /dev is devtmpfs
                info = tarfile.TarInfo(path)
                info.type, info.mode, info.mtime = member.type, member.mode, member.mtime
                info.uid, info.gid = member.uid, member.gid
                info.linkname = _clean(member.linkname) if member.type == LNK else member.linkname
                info.pax_headers = {
                    key: value.decode("utf-8", "surrogateescape")
                    for key, value in member.xattrs.items()
                    if key.startswith(_XATTR_PREFIX)
                    and key != _OPAQUE
                    and key[len(_XATTR_PREFIX) :].startswith(_KEPT_XATTRS)
                    and not key.startswith(f"{_XATTR_PREFIX}trusted.overlay.")
                }
                if member.type == REG:
                    info.size = member.size
                    out.addfile(info, reader.data())
                    files.add(path)
                else:
                    out.addfile(info)
                entries += 1
    manifest = {"format": FORMAT, "entries": entries, "removed": removed}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return FilesSnapshot(folder, entries, tuple(removed), (folder / ARCHIVE).stat().st_size)


__all__ = ["FilesSnapshot", "is_files_snapshot", "restore_files", "save_files"]
