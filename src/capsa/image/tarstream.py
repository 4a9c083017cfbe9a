"""A fast streaming tar reader and writer for merging image layers (the hot loop of an OCI import).

Python's :mod:`tarfile` costs about 5x ``tar2sqfs`` itself on a 100 MiB image: it decodes every
header into a ``TarInfo``, re-encodes it through the PAX machinery and copies data in 16 KiB pieces.
This module does only what the merge needs: it reads the layer in 1 MiB chunks (decompressing and
hashing them on a second thread: ``zlib`` (or ISA-L's, faster, when the ``isal`` package is
installed), ``lzma`` and ``hashlib`` release the GIL), decodes the
ustar / GNU / PAX header fields the merge keeps (:mod:`capsa.image.tarheader`, with Go's rules and
bounds), and writes plain ustar headers (PAX only for long names, large numbers and extended
attributes) with the file data passed through as memoryviews.

A truncated entry, a bad header, a limit broken or a corrupt compressed stream raises
:class:`TarError`, which the caller turns into an :class:`~capsa.errors.ImageError`.
"""

from __future__ import annotations

import hashlib
import lzma
import queue
import threading
import zlib
from collections.abc import Callable, Iterator
from typing import IO, Any

from capsa.image.tarheader import (
    BLOCK,
    DIR,
    FIFO,
    LNK,
    MAX_META,
    REG,
    SYM,
    Member,
    TarError,
    data_size,
    encode,
    next_member,
)

__all__ = [
    "BLOCK", "CHUNK", "DIR", "FIFO", "LNK", "MAX_META", "REG", "SYM", "Member", "Reader", "TarError",
    "header", "padding",
]  # fmt: skip

_inflate: Any
try:  # ISA-L inflates about twice as fast as zlib (the `images` extra); the same API
    from isal import isal_zlib as _inflate
except ImportError:  # pragma: no cover - depends on the install
    _inflate = zlib

CHUNK = 1 << 20
_QUEUE_CHUNKS = 8  # decoded chunks read ahead (memory bound: 8 MiB, plus decompression bursts)
_TIMEOUT = 600.0  # the reader thread never waits longer than this for the merge to take a chunk


_READ_ERRORS: tuple[type[Exception], ...] = (
    zlib.error, _inflate.error, lzma.LZMAError, EOFError, OSError, TarError,
)  # fmt: skip


class _Chunks:
    """Decoded bytes of one layer from a reader thread, which also hashes the digest's bytes."""

    def __init__(self, raw: IO[bytes], compression: str, hash_decoded: bool) -> None:
        self.sha = hashlib.sha256()
        self._raw = raw
        self._compression = compression
        self._hash_decoded = hash_decoded
        self._queue: queue.Queue[bytes | BaseException | None] = queue.Queue(_QUEUE_CHUNKS)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._run, name="capsa-layer-reader", daemon=True)
        self._thread.start()

    def _put(self, item: bytes | BaseException | None) -> None:
        waited = 0.0
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                waited += 0.5
                if waited > _TIMEOUT:
                    return

    def _read(self) -> bytes:
        data = b"" if self._stop.is_set() else self._raw.read(CHUNK)
        if not self._hash_decoded:
            self.sha.update(data)
        return data

    def _decoded(self) -> Iterator[bytes]:
        if self._compression == "gzip":
            yield from self._gunzip()
        elif self._compression == "xz":
            yield from self._unxz()
        else:
            while data := self._read():
                yield data

    def _gunzip(self) -> Iterator[bytes]:
        """Concatenated gzip members, then optional zero padding (as gzip(1) and Python accept)."""
        decompressor: Any = _inflate.decompressobj(wbits=31)
        started = False
        while data := self._read():
            while data:
                if decompressor.eof:
                    data = data.lstrip(b"\0")  # padding after a member, or the next member
                    if not data:
                        break
                    decompressor, started = _inflate.decompressobj(wbits=31), False
                started = True
                out = decompressor.decompress(data, CHUNK)
                data = decompressor.unconsumed_tail or decompressor.unused_data
                if out:
                    yield out
        if started and not decompressor.eof:
            raise TarError("the gzip-compressed layer ends early")

    def _unxz(self) -> Iterator[bytes]:
        decompressor = lzma.LZMADecompressor()
        started = False
        while data := self._read():
            while data or not (decompressor.needs_input or decompressor.eof):
                if decompressor.eof:
                    data = data.lstrip(b"\0")
                    if not data:
                        break
                    decompressor, started = lzma.LZMADecompressor(), False
                started = True
                out = decompressor.decompress(data, CHUNK)
                data = decompressor.unused_data if decompressor.eof else b""
                if out:
                    yield out
        if started and not decompressor.eof:
            raise TarError("the xz-compressed layer ends early")

    def _run(self) -> None:
        try:
            for chunk in self._decoded():
                if self._hash_decoded:
                    self.sha.update(chunk)
                self._put(chunk)
            self._put(None)
        except _READ_ERRORS as exc:
            self._put(exc if isinstance(exc, TarError) else TarError(str(exc)))
        except BaseException as exc:  # handed to the merging thread, raised there
            self._put(exc)

    def next(self) -> bytes:
        """The next decoded chunk; ``b""`` at the end."""
        if self._done:
            return b""
        try:
            item = self._queue.get(timeout=_TIMEOUT)
        except queue.Empty:
            raise TarError(f"reading the layer stalled for {_TIMEOUT:.0f}s") from None
        if item is None:
            self._done = True
            return b""
        if isinstance(item, BaseException):
            self._done = True
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=_TIMEOUT)


class Reader:
    """Iterate over the members of a layer tar; read or skip each member's data in turn."""

    def __init__(self, raw: IO[bytes], compression: str, *, hash_decoded: bool) -> None:
        self._chunks = _Chunks(raw, compression, hash_decoded)
        self._buf = b""
        self._pos = 0
        self._pending = 0  # data (with padding) of the last member not yet read or skipped

    def close(self) -> None:
        self._chunks.close()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def digest(self) -> str:
        """Read to the end (whatever follows the tar is hashed too) and return the digest."""
        while self._chunks.next():
            pass
        self._chunks.close()
        return "sha256:" + self._chunks.sha.hexdigest()

    def _fill(self, size: int) -> bool:
        while len(self._buf) - self._pos < size:
            chunk = self._chunks.next()
            if not chunk:
                return False
            self._buf = self._buf[self._pos :] + chunk
            self._pos = 0
        return True

    def _take(self, size: int) -> bytes:
        if not self._fill(size):
            raise TarError("unexpected end of data")
        data = self._buf[self._pos : self._pos + size]
        self._pos += size
        return data

    def copy(self, size: int, write: Callable[[bytes | memoryview], None]) -> None:
        """Write the current member's ``size`` data bytes (then skip its padding)."""
        padded = -size % BLOCK
        self._pending = 0
        self._consume(size, write)
        self._consume(padded, None)

    def skip(self, size: int) -> None:
        self._consume(size, None)

    def _consume(self, size: int, write: Callable[[bytes | memoryview], None] | None) -> None:
        """Pass ``size`` bytes of the stream to ``write`` (None: drop them), a buffer at a time."""
        while size:
            available = len(self._buf) - self._pos
            if not available:
                self._buf, self._pos = self._chunks.next(), 0
                if not self._buf:
                    raise TarError("unexpected end of data")
                continue
            step = min(size, available)
            if write is not None:
                write(memoryview(self._buf)[self._pos : self._pos + step])
            self._pos += step
            size -= step

    def _header(self) -> bytes | None:
        if not self._fill(BLOCK):
            if len(self._buf) - self._pos:
                raise TarError("unexpected end of data")
            return None  # the end of the input
        return self._take(BLOCK)

    def _meta(self, size: int) -> bytes:
        return self._take(size + (-size % BLOCK))[:size]

    def __iter__(self) -> Iterator[Member]:
        return self

    def __next__(self) -> Member:
        if self._pending:
            self.skip(self._pending)
            self._pending = 0
        member = next_member(self._header, self._meta)
        if member is None:
            raise StopIteration
        self._pending = data_size(member)
        return member


# -- writing --------------------------------------------------------------------------------------


def _ustar(name: bytes, kind: bytes, *, mode: int = 0o644, uid: int = 0, gid: int = 0,
           size: int = 0, mtime: int = 0, link: bytes = b"") -> bytes:  # fmt: skip
    head = b"".join((
        name.ljust(100, b"\0"), b"%07o\0" % mode, b"%07o\0" % uid, b"%07o\0" % gid,
        b"%011o\0" % size, b"%011o\0" % mtime, b"        ", kind, link.ljust(100, b"\0"),
        b"ustar\x0000", bytes(64), b"0000000\0" b"0000000\0", bytes(167),
    ))  # fmt: skip
    checksum = b"%06o\0 " % sum(head)
    return head[:148] + checksum + head[156:]


def _record(key: str, value: bytes) -> bytes:
    body = b" " + encode(key) + b"=" + value + b"\n"
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length = len(str(length)) + len(body)
    return str(length).encode() + body


def header(member: Member, name: str, linkname: str) -> bytes:
    """The ustar header of ``member`` as ``name`` (``linkname``), PAX-extended when needed."""
    raw_name = encode(name)
    raw_link = encode(linkname)
    pax: list[bytes] = []
    if len(raw_name) > 100:
        pax.append(_record("path", raw_name))
        raw_name = raw_name[:100]
    if len(raw_link) > 100:
        pax.append(_record("linkpath", raw_link))
        raw_link = raw_link[:100]
    size = member.size if member.type == REG else 0
    uid, gid, mtime = member.uid, member.gid, member.mtime
    if not 0 <= size < 8**11:
        pax.append(_record("size", str(size).encode()))
        size = 0
    if not 0 <= uid < 8**7:
        pax.append(_record("uid", str(uid).encode()))
        uid = 0
    if not 0 <= gid < 8**7:
        pax.append(_record("gid", str(gid).encode()))
        gid = 0
    if not 0 <= mtime < 8**11:
        pax.append(_record("mtime", str(mtime).encode()))
        mtime = 0
    for key, value in member.xattrs.items():
        pax.append(_record(key, value))
    mine = _ustar(raw_name, member.type, mode=member.mode & 0o7777, uid=uid, gid=gid, size=size,
                  mtime=mtime, link=raw_link)  # fmt: skip
    if not pax:
        return mine
    records = b"".join(pax)
    extended = _ustar(b"././@PaxHeader", b"x", size=len(records))
    return extended + records + bytes(-len(records) % BLOCK) + mine


def padding(size: int) -> bytes:
    return bytes(-size % BLOCK)
