"""A tar written by a guest, read as hostile bytes: every header and every member's data, padding
included, must fit in what is left of a *budget* (the bytes the guest really wrote) before a byte
of it is read, so a lying size is refused at once. Headers are decoded by
:mod:`capsa.image.tarheader` (Go's ``archive/tar`` rules and limits); on top of that, names are at
most :data:`MAX_NAME` bytes, at most :data:`MAX_CAPTURE_ENTRIES` entries, and multi-volume entries,
negative modes or device numbers and unknown entry types are refused (:class:`CaptureError`).

Used by the image builder (a build VM's step, :mod:`capsa.recipes.capture`) and by filesystem
snapshots (:mod:`capsa.sandbox.files_snapshot`). The limits are module attributes, read at each
use."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from typing import IO

from capsa.errors import CaptureError
from capsa.image.tarheader import (
    BLOCK,
    BUILTIN,
    REG,
    ZERO,
    Member,
    TarError,
    data_size,
    next_member,
)

MAX_CAPTURE_ENTRIES = 2_000_000
MAX_NAME = 4096  # PATH_MAX (tarheader allows twice that, for "./" prefixes it cleans)


def written_bytes(disk: IO[bytes]) -> int:
    """How many bytes the guest wrote from the start of ``disk`` (up to its first hole)."""
    fd = disk.fileno()
    size = os.fstat(fd).st_size
    try:
        end = os.lseek(fd, 0, os.SEEK_HOLE)
    except OSError:  # no SEEK_HOLE on this filesystem: the whole file counts
        end = size
    disk.seek(0)
    return min(end, size)


class Reader:
    """The members of the tar at the start of ``disk``, reading at most ``budget`` bytes."""

    def __init__(self, disk: IO[bytes], budget: int) -> None:
        self._disk = disk
        self.left = budget
        self._unread = 0  # data (with padding) of the last member not consumed yet
        self._pending = 0  # of which data bytes a consumer may still read
        self.entries = 0
        self._after_zero = False

    def _read(self, size: int, what: str) -> bytes:
        if size > self.left:
            raise CaptureError(f"{what} of {size} bytes goes past what the guest wrote")
        data = self._disk.read(size)
        if len(data) != size:
            raise CaptureError(f"truncated {what}")
        self.left -= size
        return data

    def _skip_unread(self) -> None:
        if self._unread:
            self._disk.seek(self._unread, os.SEEK_CUR)
            self._unread = self._pending = 0

    def _block(self) -> bytes | None:
        """The next header block, from the budget; None only for the block after a zero block
        when the guest wrote no more (Go's clean end: one zero block, then the end of the input)."""
        if self._after_zero and self.left < BLOCK:
            return None
        header = self._read(BLOCK, "tar header")
        self._after_zero = header == ZERO
        return header

    def _meta(self, size: int) -> bytes:
        """A PAX or GNU long-name header's data (``next_member`` checked it is within MAX_META)."""
        return self._read(size + (-size % BLOCK), "extended header")[:size]

    def __iter__(self) -> Iterator[Member]:
        while True:
            self._skip_unread()
            member = self._next()
            if member is None:
                return
            yield member

    def _next(self) -> Member | None:
        try:
            member = next_member(self._block, self._meta)
        except TarError as exc:  # checksum, numbers, PAX records, sparse entries, limits
            raise CaptureError(str(exc)) from None
        if member is None:
            return None
        if member.type not in BUILTIN:
            raise CaptureError(f"entry type {member.type!r} (multi-volume or unknown)")
        self.entries += 1
        if self.entries > MAX_CAPTURE_ENTRIES:
            raise CaptureError(f"more than {MAX_CAPTURE_ENTRIES} entries")
        name = member.name
        if (
            min(member.mode, member.devmajor, member.devminor) < 0
            or max(len(name), len(member.linkname)) > MAX_NAME
        ):
            raise CaptureError(f"a malformed entry {name[:80]!r}")
        member.mode &= 0o7777
        if member.type != REG:
            member.size = 0  # links, directories, devices carry no data
        padded = data_size(member)
        if padded > self.left:
            raise CaptureError(f"{name[:80]!r} claims {member.size} bytes, more than the guest wrote")
        self._unread, self._pending = padded, member.size
        self.left -= padded
        return member

    def data(self) -> IO[bytes]:
        """The current member's data (read once, in order)."""
        return io.BufferedReader(_Data(self), BLOCK * 128)


class _Data(io.RawIOBase):
    def __init__(self, reader: Reader) -> None:
        self._reader = reader

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        reader = self._reader
        count = min(len(buffer), reader._pending)
        if count <= 0:
            return 0
        got = reader._disk.readinto(buffer[:count])  # type: ignore[attr-defined]
        if not got:
            raise CaptureError("truncated file data")
        reader._pending -= got
        reader._unread -= got
        return int(got)
