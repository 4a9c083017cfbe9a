"""Boot a user's bzImage through its PVH entry: the ELF vmlinux inside it, extracted once.

Why: some stock kernels' 32-bit bzImage entry faults under QEMU 7.2 TCG direct boot (Debian's
``linux-image-6.1.0-57-cloud-amd64``, 6.1.192-3, ends in a bare ``guest-reset`` after "Probing
EDD"; 6.1.0-56 boots). A kernel built with ``CONFIG_PVH=y`` carries a PVH entry point (a Xen ELF note,
``XEN_ELFNOTE_PHYS32_ENTRY``) that QEMU enters directly when ``-kernel`` is the ELF, skipping the
real-mode setup and the decompressor: it is how capsa boots its own kernel (docs/architecture.md).

The compressed payload sits where the bzImage's setup header says (``payload_offset``,
``payload_length``, boot protocol 2.08+). gzip, xz, lzma and bzip2 are read with the standard
library; LZ4 (Debian's choice) and zstd with the ``lz4`` and ``zstd`` tools when installed. The ELF is
cached under ``<cache>/kernels/pvh/`` by the bzImage's digest, and a "no PVH entry" verdict too.
"""

from __future__ import annotations

import bz2
import hashlib
import logging
import lzma
import os
import resource
import shutil
import struct
import subprocess
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import IO, Protocol

from capsa._paths import cache_dir

log = logging.getLogger(__name__)

MAX_VMLINUX = 512 << 20  # an uncompressed x86_64 vmlinux is 30-60 MiB; a distro debug one ~400
DECOMPRESS_TIMEOUT = 120.0
_HEADER = 0x1F1
_MAGIC_AT = 0x202
_XEN_ELFNOTE_PHYS32_ENTRY = 18
_CHUNK = 1 << 20


def is_bzimage(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            head = fh.read(_MAGIC_AT + 4)
    except OSError:
        return False
    return head[_MAGIC_AT:] == b"HdrS"


def pvh_kernel(bzimage: Path) -> tuple[Path | None, str]:
    """``(the ELF to boot, "")`` when ``bzimage`` carries a PVH entry, else ``(None, why not)``."""
    digest = _digest(bzimage)
    root = cache_dir() / "kernels" / "pvh"
    root.mkdir(parents=True, exist_ok=True)
    elf, verdict = root / f"{digest}.elf", root / f"{digest}.none"
    if elf.is_file():
        return elf, ""
    if verdict.is_file():
        return None, verdict.read_text()
    fd, scratch = tempfile.mkstemp(prefix=".part-", dir=root)
    try:
        with os.fdopen(fd, "w+b") as out:
            why = _extract(bzimage, out)
            if not why:
                why = _check_pvh(out)
        if why:
            verdict.write_text(why)
            return None, why
        os.replace(scratch, elf)
        return elf, ""
    finally:
        if os.path.exists(scratch):
            os.unlink(scratch)


def _digest(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            sha.update(chunk)
    return sha.hexdigest()[:24]


def _extract(bzimage: Path, out: IO[bytes]) -> str:
    """Write the decompressed payload of ``bzimage`` to ``out``; returns why not ("" on success)."""
    data = bzimage.read_bytes()
    if len(data) < 0x250 or data[_MAGIC_AT : _MAGIC_AT + 4] != b"HdrS":
        return "not a bzImage"
    version = struct.unpack_from("<H", data, 0x206)[0]
    if version < 0x208:
        return f"boot protocol {version >> 8}.{version & 0xFF} has no payload fields (needs 2.08)"
    setup_sects = data[_HEADER] or 4
    offset, length = struct.unpack_from("<II", data, 0x248)
    start = (setup_sects + 1) * 512 + offset
    payload = data[start : start + length]
    if len(payload) != length or length < 8:
        return "its payload lies outside the file"
    for magic, name, run in _DECOMPRESSORS:
        if payload.startswith(magic):
            return run(payload, out, name)
    return f"its payload's compression (magic {payload[:4].hex()}) is not one capsa reads"


class _Decompressor(Protocol):
    """The shape of :class:`lzma.LZMADecompressor` and :class:`bz2.BZ2Decompressor`."""

    @property
    def eof(self) -> bool: ...

    @property
    def needs_input(self) -> bool: ...

    def decompress(self, data: bytes, max_length: int = -1) -> bytes: ...


def _with_stdlib(factory: Callable[[], _Decompressor]) -> Callable[[bytes, IO[bytes], str], str]:
    def run(payload: bytes, out: IO[bytes], name: str) -> str:
        decompressor = factory()
        written = 0
        pending = payload
        try:
            while not decompressor.eof:
                chunk = decompressor.decompress(pending, _CHUNK)
                pending = b""
                if not chunk and decompressor.needs_input:
                    break
                written += len(chunk)
                if written > MAX_VMLINUX:
                    return f"its {name} payload expands past {MAX_VMLINUX >> 20} MiB"
                out.write(chunk)
        except (OSError, EOFError, ValueError, zlib.error, lzma.LZMAError) as exc:
            if written == 0:
                return f"its {name} payload cannot be decompressed: {exc}"
        return ""  # whatever came out, the ELF check judges it

    return run


class _Gzip:
    """zlib's gzip decompressor in the shape of :class:`_Decompressor`."""

    def __init__(self) -> None:
        self._inner = zlib.decompressobj(wbits=31)

    @property
    def eof(self) -> bool:
        return self._inner.eof

    @property
    def needs_input(self) -> bool:
        return not self._inner.unconsumed_tail

    def decompress(self, data: bytes, max_length: int = -1) -> bytes:
        return self._inner.decompress(self._inner.unconsumed_tail + data, max(max_length, 0))


def _with_tool(tool: str) -> Callable[[bytes, IO[bytes], str], str]:
    def run(payload: bytes, out: IO[bytes], name: str) -> str:
        found = shutil.which(tool)
        if found is None:
            return f"its payload is {name}-compressed and the `{tool}` tool is not installed"

        def limit() -> None:  # the child may write at most MAX_VMLINUX bytes (SIGXFSZ past it)
            resource.setrlimit(resource.RLIMIT_FSIZE, (MAX_VMLINUX, MAX_VMLINUX))

        try:
            done = subprocess.run(
                [found, "-dc"], input=payload, stdout=out, stderr=subprocess.PIPE,
                timeout=DECOMPRESS_TIMEOUT, preexec_fn=limit, check=False,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            return f"`{tool} -dc` took over {DECOMPRESS_TIMEOUT:.0f}s"
        # The kernel appends the uncompressed size after an LZ4 stream, which `lz4` reads as a
        # broken block and exits 1 after writing everything: the ELF check below is the judge.
        out.seek(0, os.SEEK_END)
        if out.tell() == 0:
            return f"`{tool} -dc` failed: {done.stderr.decode(errors='replace')[-300:]}"
        return ""

    return run


_DECOMPRESSORS: tuple[tuple[bytes, str, Callable[[bytes, IO[bytes], str], str]], ...] = (
    (b"\x1f\x8b", "gzip", _with_stdlib(_Gzip)),
    (b"\xfd7zXZ\x00", "xz", _with_stdlib(lambda: lzma.LZMADecompressor(lzma.FORMAT_XZ))),
    (b"\x5d\x00\x00", "lzma", _with_stdlib(lambda: lzma.LZMADecompressor(lzma.FORMAT_ALONE))),
    (b"BZh", "bzip2", _with_stdlib(bz2.BZ2Decompressor)),
    (b"\x02\x21\x4c\x18", "lz4", _with_tool("lz4")),
    (b"\x28\xb5\x2f\xfd", "zstd", _with_tool("zstd")),
)


def _check_pvh(out: IO[bytes]) -> str:
    """ "" when ``out`` is a whole x86_64 ELF with a PVH entry note; else why not."""
    out.seek(0)
    head = out.read(64)
    if head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
        return "its payload is not a 64-bit little-endian ELF"
    out.seek(0, os.SEEK_END)
    size = out.tell()
    phoff = struct.unpack_from("<Q", head, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
    if phentsize < 56 or phnum > 64 or phoff + phentsize * phnum > size:
        return "its payload's ELF program headers are malformed"
    out.seek(phoff)
    table = out.read(phentsize * phnum)
    entry = False
    for index in range(phnum):
        kind, _flags, offset, _va, _pa, filesz = struct.unpack_from("<IIQQQQ", table, index * phentsize)
        if offset + filesz > size:
            return "its payload's ELF is truncated"
        if kind == 4 and filesz <= 1 << 20:  # PT_NOTE
            out.seek(offset)
            entry = entry or _has_entry_note(out.read(filesz))
    return "" if entry else "it has no PVH entry (a kernel built without CONFIG_PVH)"


def _has_entry_note(notes: bytes) -> bool:
    pos = 0
    while pos + 12 <= len(notes):
        namesz, descsz, kind = struct.unpack_from("<III", notes, pos)
        name = notes[pos + 12 : pos + 12 + namesz]
        if name == b"Xen\x00" and kind == _XEN_ELFNOTE_PHYS32_ENTRY:
            return True
        pos += 12 + ((namesz + 3) & ~3) + ((descsz + 3) & ~3)
    return False
