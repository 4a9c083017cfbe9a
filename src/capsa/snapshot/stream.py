"""Split a QEMU 7.2 migration stream into a memory image and a RAM-less state stream, in-process.

A full migration stream (``save_state`` without ``x-ignore-shared``) holds the guest RAM as page
records. This module reads it once and writes:

- the memory image: each non-zero page of the guest RAM block at its offset in a new sparse file
  (zero pages stay holes), exactly what a helper QEMU loading the stream into a ``share=on`` file
  would leave there, without the helper (~0.6 s under TCG) or the non-zero copy after it;
- the state stream: the same stream as if saved with ``x-ignore-shared`` from a VM whose RAM block
  is a shared file: the configuration section gains the ``configuration/capabilities`` subsection
  naming ``x-ignore-shared``, the RAM block list gains each block's address, the RAM block's page
  records are left out (the other blocks' pages, the ROMs, stay) and the device sections follow
  unchanged.

Only the stream layout QEMU 7.2 writes for capsa's machines is accepted (precopy, no compression,
XBZRLE, multifd or postcopy, ``ram`` the only iterable section); anything else raises
:class:`UnsupportedStream` and the caller falls back to the helper QEMU
(:func:`capsa.snapshot.memory.split_memory`).

Stream layout (QEMU ``migration/savevm.c`` and ``migration/ram.c``): a magic and version, the
configuration section (``0x07``, machine name), then sections: ``0x01`` start / ``0x04`` full
(``be32`` id, name, ``be32`` instance, ``be32`` version, data, footer ``0x7e`` + ``be32`` id) and
``0x02`` part / ``0x03`` end (``be32`` id, data, footer). RAM data is a run of records, each a
``be64`` holding the page offset and flags in its low 12 bits, until an end-of-section record.
"""

from __future__ import annotations

import functools
import mmap
import os
import re
import struct
from pathlib import Path

from capsa.errors import SnapshotError

PAGE = 4096
_MAGIC = b"QEVM\x00\x00\x00\x03"
_CONFIGURATION, _SUBSECTION = 0x07, 0x05
_START, _PART, _END, _FULL, _FOOTER = 0x01, 0x02, 0x03, 0x04, 0x7E
# RAM record flags (migration/ram.c)
_ZERO, _MEM_SIZE, _PAGE, _EOS, _CONTINUE = 0x02, 0x04, 0x08, 0x10, 0x20
_KNOWN_FLAGS = _ZERO | _MEM_SIZE | _PAGE | _EOS | _CONTINUE
_CAPABILITIES = (
    bytes([_SUBSECTION, len(b"configuration/capabilities")])
    + b"configuration/capabilities"
    + struct.pack(">II", 1, 1)
    + bytes([len(b"x-ignore-shared")])
    + b"x-ignore-shared"
)
_BIOS_BLOCK = b"pc.bios"  # mapped just below 4 GiB; every other block's region address is 0
_BE64 = struct.Struct(">Q")
# A run of records "this block's page at <offset> is all zero bytes" (CONTINUE | ZERO, fill 0): the
# bulk of a stream (every free page). Matched in C; the offsets' low 12 bits are the flags.
_ALIGNED = rb"[\x00\x10\x20\x30\x40\x50\x60\x70\x80\x90\xa0\xb0\xc0\xd0\xe0\xf0]"
_ZERO_RUN = re.compile(rb"(?:.{6}" + _ALIGNED + rb"\x22\x00)+", re.S)
_BE32 = struct.Struct(">I")


def ram_block_name(machine: str) -> str:
    """The guest RAM block's id (the machine's own RAM id, which capsa's backends also take)."""
    return "microvm.ram" if machine == "microvm" else "pc.ram"


class UnsupportedStream(Exception):
    """The stream has a layout this splitter does not handle (the helper QEMU does)."""


class _Reader:
    def __init__(self, data: bytes | mmap.mmap) -> None:
        self.data = data
        self.pos = 0

    def take(self, size: int) -> bytes:
        end = self.pos + size
        if end > len(self.data):
            raise UnsupportedStream("the stream ends early")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise UnsupportedStream("the stream ends early")
        value = self.data[self.pos]
        self.pos += 1
        return value

    def be32(self) -> int:
        return int(_BE32.unpack(self.take(4))[0])

    def be64(self) -> int:
        return int(_BE64.unpack(self.take(8))[0])

    def name(self) -> bytes:
        return self.take(self.byte())


def split_stream(stream: Path, memory: Path, state: Path, ram_block: str) -> int:
    """Write ``memory`` (sparse, only ``ram_block``'s non-zero pages) and ``state`` from the full
    migration ``stream``; returns the bytes of guest RAM written. Raises :class:`UnsupportedStream`
    (nothing useful written; the caller removes both files) for a layout it does not know."""
    try:
        with open(stream, "rb") as file:
            data = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as exc:
        raise SnapshotError(f"cannot read the migration stream: {exc}", path=stream) from exc
    out: list[bytes] = []
    try:
        fd = os.open(memory, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        data.close()
        raise SnapshotError(f"cannot create the memory image: {exc}", path=memory) from exc
    try:
        written = _split(_Reader(data), out, fd, ram_block.encode())
        os.fsync(fd)
    except OSError as exc:
        raise SnapshotError(
            f"writing the memory image failed: {exc}",
            path=memory,
            hint=f"the image needs as much free space as the guest uses where {memory.parent} is",
        ) from exc
    finally:
        os.close(fd)
        data.close()
    try:
        with open(state, "xb") as file:
            file.writelines(out)
            file.flush()
            os.fsync(file.fileno())
    except OSError as exc:
        raise SnapshotError(f"writing the VM state failed: {exc}", path=state) from exc
    return written


def _split(reader: _Reader, out: list[bytes], fd: int, ram_block: bytes) -> int:
    if reader.take(len(_MAGIC)) != _MAGIC:
        raise UnsupportedStream("not a version 3 migration stream")
    out.append(_MAGIC)
    if reader.byte() != _CONFIGURATION:
        raise UnsupportedStream("no configuration section")
    machine = reader.take(reader.be32())
    out.append(bytes([_CONFIGURATION]) + _BE32.pack(len(machine)) + machine + _CAPABILITIES)
    if reader.data[reader.pos : reader.pos + 1] == bytes([_SUBSECTION]):
        raise UnsupportedStream("the configuration already has subsections")
    ram_id: int | None = None
    image = _Image(fd, ram_block)
    while True:
        start = reader.pos
        kind = reader.byte()
        if kind == _START:
            section = reader.be32()
            name = reader.name()
            if name != b"ram" or ram_id is not None:
                raise UnsupportedStream(f"iterable section {name!r}")
            ram_id = section
            out.append(reader.data[start : reader.pos + 8])  # + instance and version
            reader.take(8)
        elif kind in (_PART, _END):
            section = reader.be32()
            if section != ram_id:
                raise UnsupportedStream(f"section {section} is not ram")
            out.append(reader.data[start : reader.pos])
        elif kind == _FULL:
            if ram_id is None:
                raise UnsupportedStream("device state before the RAM")
            out.append(reader.data[start:])  # the device sections and the end, unchanged
            image.finish()
            return image.written
        else:
            raise UnsupportedStream(f"section type {kind:#x}")
        _ram_records(reader, out, image)
        if reader.byte() != _FOOTER or reader.be32() != section:
            raise UnsupportedStream("a section without its footer")
        out.append(bytes([_FOOTER]) + _BE32.pack(section))


class _Image:
    """The memory image being written: runs of consecutive pages become one ``pwrite``."""

    def __init__(self, fd: int, block: bytes) -> None:
        self.fd = fd
        self.block = block
        self.size = 0
        self.written = 0
        self.dirty = bytearray()  # one byte per page: 1 once data was written there
        self.run_start = -1
        self.run: list[bytes] = []
        self.last_block: bytes | None = None

    def page(self, offset: int, data: bytes) -> None:
        if self.run and offset == self.run_start + len(self.run) * PAGE:
            self.run.append(data)
        else:
            self.flush()
            self.run_start, self.run = offset, [data]
        index = offset // PAGE
        if index < len(self.dirty):
            self.dirty[index] = 1

    def zero(self, offset: int, fill: int) -> None:
        index = offset // PAGE
        if fill:
            self.page(offset, bytes([fill]) * PAGE)
        elif index < len(self.dirty) and self.dirty[index]:  # a page sent earlier became zero
            self.page(offset, bytes(PAGE))
            self.dirty[index] = 0

    def flush(self) -> None:
        if not self.run:
            return
        data = memoryview(b"".join(self.run))
        offset = self.run_start
        while data:
            done = os.pwrite(self.fd, data, offset)
            data, offset = data[done:], offset + done
        self.written += len(self.run) * PAGE
        self.run = []

    def finish(self) -> None:
        self.flush()
        os.ftruncate(self.fd, self.size)


def _ram_records(reader: _Reader, out: list[bytes], image: _Image) -> None:
    """Copy one section's RAM records to ``out``, except the RAM block's pages (to ``image``)."""
    data = reader.data
    kept = reader.pos  # start of the bytes not yet copied to ``out``
    while True:
        record = reader.pos
        if image.last_block == image.block and _skip_zero_run(reader, image):
            out.append(data[kept:record])
            kept = reader.pos
            continue
        header = reader.be64()
        flags = header & (PAGE - 1)
        offset = header - flags
        if flags & ~_KNOWN_FLAGS:
            raise UnsupportedStream(f"RAM record flags {flags:#x}")
        if flags & _EOS:
            out.append(data[kept : reader.pos])
            return
        if flags & _MEM_SIZE:
            out.append(data[kept:record])
            out.append(_mem_size(reader, offset, image))
            kept = reader.pos
            continue
        if not flags & _CONTINUE:
            image.last_block = reader.name()  # CONTINUE refers to it, across sections too
        elif image.last_block is None:
            raise UnsupportedStream("a continued RAM record without a block")
        current = image.last_block
        if flags & _ZERO:
            fill = reader.byte()
            if current == image.block:
                out.append(data[kept:record])
                image.zero(offset, fill)
                kept = reader.pos
        elif flags & _PAGE:
            page = reader.take(PAGE)
            if current == image.block:
                out.append(data[kept:record])
                image.page(offset, page)
                kept = reader.pos
        else:
            raise UnsupportedStream(f"RAM record flags {flags:#x}")


def _mem_size(reader: _Reader, total: int, image: _Image) -> bytes:
    """The RAM block list, each block with its region address added (``x-ignore-shared``)."""
    parts = [_BE64.pack(total | _MEM_SIZE)]
    while total > 0:
        name = reader.name()
        length = reader.be64()
        address = (1 << 32) - length if name == _BIOS_BLOCK else 0
        parts.append(bytes([len(name)]) + name + _BE64.pack(length) + _BE64.pack(address))
        if name == image.block:
            image.size = length
            image.dirty = bytearray(length // PAGE)
        total -= length
    if total != 0 or image.size == 0:
        raise UnsupportedStream("the RAM block list does not add up or lacks the guest RAM")
    return b"".join(parts)


def _skip_zero_run(reader: _Reader, image: _Image) -> bool:
    """Step over a run of zero-page records of the RAM block at once (they leave holes) when the run
    is exactly consecutive ascending pages none of which was written earlier in the stream; any other
    run goes record by record."""
    match = _ZERO_RUN.match(reader.data, reader.pos)
    if match is None:
        return False
    start, end = match.span()
    first = _BE64.unpack_from(reader.data, start)[0] // PAGE
    count = (end - start) // 9
    expected = _zero_records(image.size // PAGE)
    if first + count > image.size // PAGE:
        return False
    if reader.data[start:end] != expected[first * 9 : (first + count) * 9]:
        return False  # not one ascending run (a later pass, or another layout)
    if 1 in image.dirty[first : first + count]:
        return False  # it zeroes pages written before: those need writing
    reader.pos = end
    return True


@functools.lru_cache(maxsize=2)
def _zero_records(pages: int) -> bytes:
    """The records "page i is zero" (CONTINUE | ZERO, fill 0) for every page, in order: a run in a
    stream is checked against a slice of this with one comparison."""
    return b"".join(_BE64.pack((index * PAGE) | _ZERO | _CONTINUE) + b"\x00" for index in range(pages))
