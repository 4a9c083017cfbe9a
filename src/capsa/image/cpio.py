"""A writer for the cpio "newc" format the Linux kernel unpacks as an initramfs.

Why hand-written: the format is ~40 lines of header packing, no maintained PyPI package writes it, and
calling the ``cpio`` tool would need a staging directory with real ownership and device nodes (root).
Writing entries directly lets an unprivileged user put ``/dev/console`` and root-owned files in the
archive.

Format reference: the kernel's ``Documentation/driver-api/early-userspace/buffer-format.rst``.
"""

from __future__ import annotations

import stat
from pathlib import Path
from typing import BinaryIO

_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"


class CpioWriter:
    """Streams newc entries to a binary file object. Directories must be added before their contents."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._ino = 1
        self._seen: set[str] = set()
        self._closed = False

    def _entry(
        self,
        name: str,
        mode: int,
        data: bytes = b"",
        *,
        uid: int = 0,
        gid: int = 0,
        rdev_major: int = 0,
        rdev_minor: int = 0,
        mtime: int = 0,
    ) -> None:
        if self._closed:
            raise ValueError("cpio archive already closed")
        name = name.strip("/") if name != _TRAILER else name
        if not name:
            raise ValueError("empty cpio entry name")
        if name != _TRAILER:
            if name in self._seen:
                raise ValueError(f"duplicate cpio entry: {name}")
            self._seen.add(name)
        encoded = name.encode() + b"\0"
        fields = (
            self._ino,
            mode,
            uid,
            gid,
            1 if not stat.S_ISDIR(mode) else 2,
            mtime,
            len(data),
            0,
            0,
            rdev_major,
            rdev_minor,
            len(encoded),
            0,
        )
        self._ino += 1
        header = _MAGIC + b"".join(b"%08X" % f for f in fields)
        self._out.write(header)
        self._out.write(encoded)
        self._out.write(b"\0" * (-(len(header) + len(encoded)) % 4))
        self._out.write(data)
        self._out.write(b"\0" * (-len(data) % 4))

    def add_dir(self, name: str, perm: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | perm)

    def add_file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def add_symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def add_char_device(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | perm, rdev_major=major, rdev_minor=minor)

    def add_host_file(self, name: str, source: Path, perm: int | None = None) -> None:
        """Copy a host file's bytes; the mode defaults to the source's permission bits."""
        mode = perm if perm is not None else stat.S_IMODE(source.stat().st_mode)
        self.add_file(name, source.read_bytes(), mode)

    def close(self) -> None:
        """Write the trailer entry; the archive is complete after this."""
        if not self._closed:
            self._entry(_TRAILER, 0)
            self._closed = True
