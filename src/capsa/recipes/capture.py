"""What a build VM wrote: the tar of a step's changes on its output disk, read as hostile bytes.

The guest is root in its build VM and may write anything on the output disk, not only GNU tar's
honest archive. Python's :mod:`tarfile` trusts headers: a 512-byte header claiming 30 GiB makes it
read (or, for a PAX or GNU long-name header, hold in memory) that much of the sparse disk. This
reader bounds everything by what the guest really wrote:

- the *budget* is the run of bytes the guest wrote from the start of the disk: up to the disk's
  first hole (``SEEK_HOLE``: an honest tar is written in one piece; a hole was never written), at
  most :data:`MAX_CAPTURE_BYTES`. Every header and every member's data, padding included, must fit
  in what is left of it *before* a byte of it is read, so a lying size is refused at once;
- the headers themselves are decoded by :mod:`capsa.image.tarheader`, the OCI importer's decoder
  (Go's ``archive/tar`` rules and its limits: checksums, numbers, PAX records, PAX and GNU
  long-name headers of at most ``tarheader.MAX_META`` bytes, ids, extended attributes; sparse
  entries, GNU ``S`` or PAX ``GNU.sparse.*``, are refused there); its :class:`TarError` is a
  :class:`CaptureError` here. On top of that: names at most :data:`MAX_NAME` bytes, at most
  :data:`MAX_CAPTURE_ENTRIES` entries, and multi-volume entries, negative modes or device numbers
  and unknown entry types are refused: GNU tar writes none of them here.

Names and link targets are checked by :class:`capsa.recipes.layertar.LayerTar` (``..`` is refused);
device nodes other than whiteouts are dropped. The limits are module attributes, read at each use.
"""

from __future__ import annotations

import io
import logging
import os
import posixpath
import tarfile
from collections.abc import Iterator
from typing import IO

from capsa.errors import CaptureError
from capsa.image.sandbox import BUILD_UPPER
from capsa.image.tarheader import (
    BLK,
    BLOCK,
    BUILTIN,
    CHR,
    LNK,
    REG,
    ZERO,
    Member,
    TarError,
    data_size,
    next_member,
)
from capsa.recipes.layertar import LayerTar

log = logging.getLogger(__name__)

MAX_CAPTURE_BYTES = 32 << 30  # never more than the output disk (recipe_run.MAX_LAYER_BYTES)
MAX_CAPTURE_ENTRIES = 2_000_000
MAX_NAME = 4096  # PATH_MAX (tarheader allows twice that, for "./" prefixes it cleans)
_OPAQUE = "SCHILY.xattr.trusted.overlay.opaque"
# Left by capsa itself in the user's root, never part of a layer.
_UPPER = BUILD_UPPER.strip("/")
_SKIP = {_UPPER, "etc/resolv.conf", "etc/hostname"}


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


def add_captured(layer: LayerTar, disk: IO[bytes]) -> int:
    """Copy the captured upper directory (the tar at the start of ``disk``) into ``layer``;
    returns the number of entries. CaptureError for anything GNU tar would not have written."""
    budget = min(written_bytes(disk), MAX_CAPTURE_BYTES)
    reader = Reader(disk, budget)
    count = 0
    opaque: list[str] = []
    for member in reader:
        path = posixpath.normpath("/" + member.name).strip("/")
        if not path or path in _SKIP or path.startswith(f"{_UPPER}/"):
            continue
        if member.xattrs.get(_OPAQUE) == b"y":
            opaque.append(path)
        if member.type in (CHR, BLK) and not (
            member.type == CHR and member.devmajor == 0 and member.devminor == 0
        ):
            continue  # device nodes: the guest's /dev is devtmpfs; 0/0 is a whiteout
        info = tarfile.TarInfo(path)
        info.type, info.mode, info.mtime = member.type, member.mode, member.mtime
        info.uid, info.gid, info.linkname = member.uid, member.gid, member.linkname
        info.devmajor, info.devminor = member.devmajor, member.devminor
        if member.type == LNK:
            info.linkname = member.linkname.removeprefix("./")
        if member.type == REG:
            info.size = member.size
            layer.add(info, reader.data())
        else:
            layer.add(info)
        count += 1
    log.debug("capture: %d entries, %d of %d budget bytes unread", count, reader.left, budget)
    if opaque:  # mostly directories new to the image (nothing below to hide): not worth a warning
        log.info(
            "run(): opaque directories keep the entries of the layers below, if any: /%s",
            ", /".join(opaque[:5]),
        )
    return count
