"""cpio newc writer and module dependency resolution (no VM)."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import pytest

from capsa.errors import ImageError
from capsa.image.cpio import CpioWriter
from capsa.image.modules import ModuleIndex, read_modinfo


def parse_newc(data: bytes) -> list[tuple[str, int, bytes, int, int]]:
    """Independent reader: (name, mode, body, rdev_major, rdev_minor) per entry."""
    entries = []
    pos = 0
    while True:
        assert data[pos : pos + 6] == b"070701"
        fields = [int(data[pos + 6 + i * 8 : pos + 14 + i * 8], 16) for i in range(13)]
        namesize, filesize = fields[11], fields[6]
        name_start = pos + 110
        name = data[name_start : name_start + namesize - 1].decode()
        body_start = (name_start + namesize + 3) & ~3
        body = data[body_start : body_start + filesize]
        pos = (body_start + filesize + 3) & ~3
        if name == "TRAILER!!!":
            return entries
        entries.append((name, fields[1], body, fields[9], fields[10]))


def test_cpio_round_trip() -> None:
    out = io.BytesIO()
    cpio = CpioWriter(out)
    cpio.add_dir("bin")
    cpio.add_file("bin/tool", b"x" * 5, 0o755)
    cpio.add_symlink("bin/sh", "/bin/busybox")
    cpio.add_char_device("dev/console", 5, 1)
    cpio.close()
    data = out.getvalue()
    assert len(data) % 4 == 0
    entries = parse_newc(data)
    assert [e[0] for e in entries] == ["bin", "bin/tool", "bin/sh", "dev/console"]
    assert entries[1][1] == 0o100755 and entries[1][2] == b"xxxxx"
    assert entries[2][2] == b"/bin/busybox"
    assert entries[3][3:] == (5, 1)


def test_cpio_refuses_duplicates_and_writes_after_close() -> None:
    cpio = CpioWriter(io.BytesIO())
    cpio.add_file("a", b"")
    with pytest.raises(ValueError):
        cpio.add_file("a", b"")
    cpio.close()
    with pytest.raises(ValueError):
        cpio.add_file("b", b"")


def fake_module(modinfo: dict[str, str]) -> bytes:
    """A minimal ELF64 with a .modinfo section, enough for read_modinfo."""
    info = b"".join(f"{k}={v}".encode() + b"\0" for k, v in modinfo.items())
    shstr = b"\0.modinfo\0.shstrtab\0"
    info_off = 64
    shstr_off = info_off + len(info)
    shoff = (shstr_off + len(shstr) + 7) & ~7
    header = bytearray(64)
    header[:5] = b"\x7fELF\x02"
    struct.pack_into("<Q", header, 0x28, shoff)
    struct.pack_into("<HHH", header, 0x3A, 64, 3, 2)
    body = bytes(header) + info + shstr
    body += b"\0" * (shoff - len(body))

    def section(name_off: int, offset: int, size: int) -> bytes:
        sh = bytearray(64)
        struct.pack_into("<I", sh, 0, name_off)
        struct.pack_into("<QQ", sh, 0x18, offset, size)
        return bytes(sh)

    return body + section(0, 0, 0) + section(1, info_off, len(info)) + section(10, shstr_off, len(shstr))


def test_read_modinfo() -> None:
    info = read_modinfo(fake_module({"depends": "a,b", "softdep": "pre: crc32c", "name": "x"}))
    assert info["depends"] == ["a,b"] and info["softdep"] == ["pre: crc32c"]
    with pytest.raises(ImageError):
        read_modinfo(b"not an elf at all" * 10)


def test_load_order_dependencies_first(tmp_path: Path) -> None:
    tree = tmp_path / "lib/modules/6.1"
    (tree / "kernel").mkdir(parents=True)
    (tree / "kernel/virtio.ko").write_bytes(fake_module({"depends": "virtio_ring"}))
    (tree / "kernel/virtio_ring.ko").write_bytes(fake_module({"depends": ""}))
    (tree / "kernel/virtio-blk.ko").write_bytes(fake_module({"depends": "virtio,virtio_ring"}))
    (tree / "kernel/erofs.ko").write_bytes(fake_module({"depends": "", "softdep": "pre: crc32c"}))
    (tree / "kernel/crc32c_generic.ko").write_bytes(fake_module({"depends": ""}))
    (tree / "modules.builtin").write_text("kernel/fs/ext4/ext4.ko\n")
    index = ModuleIndex(tree)
    names = [m.name for m in index.load_order(["virtio_blk", "ext4", "virtio"])]
    assert names == ["virtio_ring", "virtio", "virtio_blk"]
    # The softdep 'crc32c' is an alias with no file here, so it is optional and skipped.
    assert [m.name for m in index.load_order(["erofs"])] == ["erofs"]
    with pytest.raises(ImageError, match="not found"):
        index.load_order(["no_such_module"])
