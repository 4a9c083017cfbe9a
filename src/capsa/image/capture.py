"""What a build VM wrote: the tar of a step's changes on its output disk, read as hostile bytes.

The guest is root in its build VM and may write anything on the output disk, not only GNU tar's
honest archive. Python's :mod:`tarfile` trusts headers: a 512-byte header claiming 30 GiB makes it
read (or, for a PAX or GNU long-name header, hold in memory) that much of the sparse disk. This
reader bounds everything by what the guest really wrote:

- the *budget* is the run of bytes the guest wrote from the start of the disk: up to the disk's
  first hole (``SEEK_HOLE``: an honest tar is written in one piece; a hole was never written), at
  most :data:`MAX_CAPTURE_BYTES`. Every header and every member's data, padding included, must fit
  in what is left of it *before* a byte of it is read, so a lying size is refused at once;
- header checksums are checked; PAX records and GNU long names are at most :data:`MAX_META` bytes
  (they are held in memory); names at most :data:`MAX_NAME` bytes; at most
  :data:`MAX_CAPTURE_ENTRIES` entries;
- sparse entries (GNU ``S``, PAX ``GNU.sparse.*``), multi-volume entries, negative or malformed
  numbers and unknown entry types are refused: GNU tar writes none of them here.

Names and link targets are checked by :class:`capsa.image.recipe.LayerTar` (``..`` is refused);
device nodes other than whiteouts are dropped. The limits are module attributes, read at each use.
"""

from __future__ import annotations

import io
import logging
import os
import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO

from capsa.errors import ImageError
from capsa.image.recipe import LayerTar
from capsa.image.sandbox import BUILD_UPPER

log = logging.getLogger(__name__)

BLOCK = 512
MAX_CAPTURE_BYTES = 32 << 30  # never more than the output disk (recipe_run.MAX_LAYER_BYTES)
MAX_CAPTURE_ENTRIES = 2_000_000
MAX_META = 1 << 20  # one PAX header's records, one GNU long name
MAX_NAME = 4096  # PATH_MAX
_REGULAR = (b"0", b"\0", b"7")
_KINDS = (*_REGULAR, b"1", b"2", b"3", b"4", b"5", b"6")
_OPAQUE = "SCHILY.xattr.trusted.overlay.opaque"
_MAX_ID = (1 << 32) - 1
# Left by capsa itself in the user's root, never part of a layer.
_UPPER = BUILD_UPPER.strip("/")
_SKIP = {_UPPER, "etc/resolv.conf", "etc/hostname"}


class CaptureError(ImageError):
    """The build VM's output is not an archive capsa accepts."""

    def __init__(self, message: str) -> None:
        super().__init__(
            f"the build VM's capture is refused: {message}",
            hint="the step's guest wrote something other than GNU tar's archive of its changes",
        )


@dataclass
class Member:
    name: str
    type: bytes  # normalised: a regular file is b"0"
    mode: int
    uid: int
    gid: int
    size: int
    mtime: int
    linkname: str
    devmajor: int
    devminor: int
    pax: dict[str, str] = field(default_factory=dict)


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


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def _number(raw: bytes, what: str) -> int:
    if raw[:1] == b"\x80":  # GNU base-256, positive
        return int.from_bytes(raw[1:], "big")
    if raw[:1] == b"\xff":
        raise CaptureError(f"negative {what}")
    text = raw.split(b"\0", 1)[0].strip(b" ")
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise CaptureError(f"invalid {what} field {raw!r}") from None


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _checksum_ok(header: bytes) -> bool:
    stored = _number(header[148:156], "checksum")
    blanked = header[:148] + b" " * 8 + header[156:]
    unsigned = sum(blanked)
    signed = sum(b - 256 if b > 127 else b for b in blanked)
    return stored in (unsigned, signed)


def _pax(data: bytes) -> dict[str, str]:
    """PAX records (``LEN key=value\\n``), each length checked."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos, pos + 20)
        if space < 0 or not data[pos:space].isdigit():
            if not data[pos:].strip(b"\0"):
                break  # padding
            raise CaptureError("malformed PAX record")
        length = int(data[pos:space])
        record = data[space + 1 : pos + length]
        if length <= space - pos or pos + length > len(data) or not record.endswith(b"\n"):
            raise CaptureError("malformed PAX record length")
        key, eq, value = record[:-1].partition(b"=")
        if not eq:
            raise CaptureError("PAX record without '='")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


class Reader:
    """The members of the tar at the start of ``disk``, reading at most ``budget`` bytes."""

    def __init__(self, disk: IO[bytes], budget: int) -> None:
        self._disk = disk
        self.left = budget
        self._unread = 0  # data (with padding) of the last member not consumed yet
        self._pending = 0  # of which data bytes a consumer may still read
        self.entries = 0

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

    def _meta(self, size: int, what: str) -> bytes:
        if size > MAX_META:
            raise CaptureError(f"a {what} of {size} bytes (at most {MAX_META})")
        return self._read(_padded(size), what)[:size]

    def __iter__(self) -> Iterator[Member]:
        while True:
            self._skip_unread()
            member = self._next()
            if member is None:
                return
            yield member

    def _next(self) -> Member | None:
        pax: dict[str, str] = {}
        long_name = long_link = None
        while True:
            header = self._read(BLOCK, "tar header")
            if header == bytes(BLOCK):
                return None  # end of archive
            if not _checksum_ok(header):
                raise CaptureError("a tar header has a bad checksum")
            kind = header[156:157]
            size = _number(header[124:136], "size")
            if kind == b"x":
                pax.update(_pax(self._meta(size, "PAX header")))
            elif kind == b"g":
                self._meta(size, "PAX global header")  # nothing in it applies here
            elif kind in (b"L", b"K"):
                value = _text(self._meta(size, "GNU long name"))
                long_name, long_link = (value, long_link) if kind == b"L" else (long_name, value)
            elif kind in _KINDS:
                break
            else:
                raise CaptureError(f"entry type {kind!r} (sparse, multi-volume or unknown)")
        self.entries += 1
        if self.entries > MAX_CAPTURE_ENTRIES:
            raise CaptureError(f"more than {MAX_CAPTURE_ENTRIES} entries")
        if any(key.startswith("GNU.sparse.") for key in pax):
            raise CaptureError("a sparse entry")
        name = _text(header[0:100])
        if header[257:263] == b"ustar\0" and header[345:500].strip(b"\0"):
            name = f"{_text(header[345:500])}/{name}"
        name = pax.get("path", long_name if long_name is not None else name)
        linkname = pax.get("linkpath", long_link if long_link is not None else _text(header[157:257]))
        try:
            size = int(pax.get("size", size))
            mtime = int(float(pax.get("mtime", _number(header[136:148], "mtime"))))
            uid = int(pax.get("uid", _number(header[108:116], "uid")))
            gid = int(pax.get("gid", _number(header[116:124], "gid")))
        except (ValueError, OverflowError):
            raise CaptureError("a PAX number is malformed") from None
        if (
            min(size, uid, gid) < 0
            or max(uid, gid) > _MAX_ID
            or max(len(name), len(linkname)) > MAX_NAME
        ):
            raise CaptureError(f"a malformed entry {name[:80]!r}")
        kind = b"0" if kind in _REGULAR else kind
        data = size if kind == b"0" else 0  # links, directories, devices carry no data
        if _padded(data) > self.left:
            raise CaptureError(f"{name[:80]!r} claims {size} bytes, more than the guest wrote")
        self._unread, self._pending = _padded(data), data
        self.left -= _padded(data)
        return Member(
            name, kind, _number(header[100:108], "mode") & 0o7777, uid, gid, data, mtime, linkname,
            _number(header[329:337], "devmajor"), _number(header[337:345], "devminor"), pax,
        )  # fmt: skip

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
        if member.pax.get(_OPAQUE) == "y":
            opaque.append(path)
        if member.type in (b"3", b"4") and not (
            member.type == b"3" and member.devmajor == 0 and member.devminor == 0
        ):
            continue  # device nodes: the guest's /dev is devtmpfs; 0/0 is a whiteout
        info = tarfile.TarInfo(path)
        info.type, info.mode, info.mtime = member.type, member.mode, member.mtime
        info.uid, info.gid, info.linkname = member.uid, member.gid, member.linkname
        info.devmajor, info.devminor = member.devmajor, member.devminor
        if member.type == b"1":
            info.linkname = member.linkname.removeprefix("./")
        if member.type == b"0":
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
