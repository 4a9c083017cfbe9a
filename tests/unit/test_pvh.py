"""A bzImage's PVH entry (capsa.vm.pvh): the ELF inside is found, checked for the PVH note and cached;
a kernel without the note, or a payload capsa cannot read, says why (no VM)."""

from __future__ import annotations

import gzip
import lzma
import struct
from pathlib import Path

import pytest

from capsa.vm.pvh import is_bzimage, pvh_kernel


def _elf(*, pvh: bool) -> bytes:
    """A minimal x86_64 ELF with one PT_NOTE segment (a Xen PHYS32_ENTRY note when ``pvh``)."""
    note_type = 18 if pvh else 6
    note = struct.pack("<III", 4, 4, note_type) + b"Xen\x00" + struct.pack("<I", 0x1000000)
    phoff, phentsize = 64, 56
    note_offset = phoff + phentsize
    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", header, 0x20, phoff)
    struct.pack_into("<HH", header, 0x36, phentsize, 1)
    phdr = struct.pack("<IIQQQQQQ", 4, 4, note_offset, 0, 0, len(note), len(note), 4)
    return bytes(header) + phdr + note + b"\0" * 4096


def _bzimage(payload: bytes, *, version: int = 0x20F) -> bytes:
    setup_sects = 4
    image = bytearray((setup_sects + 1) * 512)
    image[0x1F1] = setup_sects
    image[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", image, 0x206, version)
    struct.pack_into("<II", image, 0x248, 0, len(payload))
    return bytes(image) + payload + struct.pack("<I", 1234)  # the kernel appends the size


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPSA_CACHE_DIR", str(tmp_path / "cache"))


@pytest.mark.parametrize("compress", [gzip.compress, lzma.compress], ids=["gzip", "xz"])
def test_a_pvh_kernel_is_extracted_and_cached(tmp_path: Path, compress: object) -> None:
    elf = _elf(pvh=True)
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(_bzimage(compress(elf)))  # type: ignore[operator]
    assert is_bzimage(kernel)
    found, why = pvh_kernel(kernel)
    assert why == "" and found is not None
    assert found.read_bytes() == elf
    assert pvh_kernel(kernel) == (found, "")  # found again in the cache


def test_a_kernel_without_the_note_says_so(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(_bzimage(gzip.compress(_elf(pvh=False))))
    assert pvh_kernel(kernel) == (None, "it has no PVH entry (a kernel built without CONFIG_PVH)")
    assert pvh_kernel(kernel)[0] is None  # the verdict is cached too


def test_unreadable_payloads_and_old_headers_say_why(tmp_path: Path) -> None:
    unknown = tmp_path / "unknown"
    unknown.write_bytes(_bzimage(b"\x99\x98\x97\x96" + b"x" * 64))
    assert "compression (magic 99989796)" in pvh_kernel(unknown)[1]
    old = tmp_path / "old"
    old.write_bytes(_bzimage(gzip.compress(_elf(pvh=True)), version=0x206))
    assert "needs 2.08" in pvh_kernel(old)[1]
    not_elf = tmp_path / "not-elf"
    not_elf.write_bytes(_bzimage(gzip.compress(b"plain text, not an ELF" * 10)))
    assert pvh_kernel(not_elf) == (None, "its payload is not a 64-bit little-endian ELF")


def test_an_elf_is_not_a_bzimage(tmp_path: Path) -> None:
    elf = tmp_path / "vmlinux"
    elf.write_bytes(_elf(pvh=True))
    assert not is_bzimage(elf)


DEBIAN_57 = Path.home() / ".cache/capsa/kernels/linux-image-6.1.0-57-cloud-amd64/root/boot"


@pytest.mark.skipif(not DEBIAN_57.is_dir(), reason="Debian's 6.1.0-57 cloud kernel is not cached")
def test_debians_lz4_bzimage_has_a_pvh_entry() -> None:
    """The kernel of issue 27 (its bzImage entry faults under QEMU 7.2 TCG on some hosts)."""
    pytest.importorskip("shutil").which("lz4") or pytest.skip("no lz4 tool")
    (kernel,) = DEBIAN_57.glob("vmlinuz-*")
    found, why = pvh_kernel(kernel)
    assert why == "" and found is not None
    assert found.read_bytes()[:4] == b"\x7fELF"
