"""The in-process migration-stream splitter (capsa.snapshot.stream) on hand-built QEMU 7.2 streams.

The integration tests restore real forks made this way; these pin the stream rules one by one: zero
pages stay holes, a page sent twice keeps its last content, a page zeroed after being sent is zeroed,
other blocks' pages (ROMs) stay in the state with CONTINUE records intact, the RAM block list gains
addresses, and any layout it does not know is refused (the caller falls back to the helper QEMU).
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from capsa.snapshot.stream import PAGE, UnsupportedStream, split_stream

RAM = b"microvm.ram"
ROM = b"/rom@etc/acpi/tables"
BIOS = b"pc.bios"
RAM_SIZE = 16 * PAGE
ROM_SIZE = 2 * PAGE
BIOS_SIZE = PAGE
ZERO, MEM_SIZE, PAGE_FLAG, EOS, CONTINUE = 0x02, 0x04, 0x08, 0x10, 0x20


def be64(value: int) -> bytes:
    return struct.pack(">Q", value)


def name(block: bytes) -> bytes:
    return bytes([len(block)]) + block


def record(offset: int, flags: int, block: bytes | None, body: bytes) -> bytes:
    return be64(offset | flags | (0 if block else CONTINUE)) + (name(block) if block else b"") + body


def header() -> bytes:
    return b"QEVM\x00\x00\x00\x03" + b"\x07" + struct.pack(">I", 7) + b"microvm"


def section_start(blocks: list[tuple[bytes, int]], with_address: bool = False) -> bytes:
    total = sum(size for _, size in blocks)
    body = be64(total | MEM_SIZE)
    for block, size in blocks:
        body += name(block) + be64(size)
        if with_address:
            body += be64((1 << 32) - size if block == BIOS else 0)
    return b"\x01" + struct.pack(">I", 2) + name(b"ram") + struct.pack(">II", 0, 4) + body


def part(records: bytes, kind: int = 0x02) -> bytes:
    return bytes([kind]) + struct.pack(">I", 2) + records + be64(EOS) + b"\x7e" + struct.pack(">I", 2)


def footer() -> bytes:
    return be64(EOS) + b"\x7e" + struct.pack(">I", 2)


DEVICES = (
    b"\x04" + struct.pack(">I", 3) + name(b"cpu") + struct.pack(">II", 0, 1) + b"cpu-state" + b"\x00"
)
BLOCKS = [(RAM, RAM_SIZE), (ROM, ROM_SIZE), (BIOS, BIOS_SIZE)]


def page(byte: int) -> bytes:
    return bytes([byte]) * PAGE


def build(*parts: bytes) -> bytes:
    return header() + section_start(BLOCKS) + footer() + b"".join(parts) + DEVICES


def split(tmp_path: Path, data: bytes) -> tuple[bytes, bytes, int]:
    stream = tmp_path / "stream"
    stream.write_bytes(data)
    written = split_stream(stream, tmp_path / "memory", tmp_path / "state", RAM.decode())
    return (tmp_path / "memory").read_bytes(), (tmp_path / "state").read_bytes(), written


def test_ram_pages_go_to_a_sparse_image_and_roms_stay_in_the_state(tmp_path: Path) -> None:
    first = (
        record(0, ZERO, RAM, b"\x00")
        + b"".join(record(i * PAGE, ZERO, None, b"\x00") for i in range(1, 5))
        + record(5 * PAGE, PAGE_FLAG, None, page(0x55))
        + record(6 * PAGE, PAGE_FLAG, None, page(0x66))
        + record(0, PAGE_FLAG, ROM, page(0xAA))
        + record(PAGE, PAGE_FLAG, None, page(0xAB))  # CONTINUE: still the ROM
        + record(9 * PAGE, ZERO, RAM, b"\x07")  # a zero record with a fill byte
    )
    second = (
        record(PAGE, ZERO, None, b"\x00")  # CONTINUE across sections: the RAM block again
        + record(5 * PAGE, PAGE_FLAG, None, page(0x5A))  # sent again: the last one wins
        + record(6 * PAGE, ZERO, None, b"\x00")  # zeroed after it was sent
        + record(0, PAGE_FLAG, BIOS, page(0xB1))
    )
    memory, state, written = split(tmp_path, build(part(first), part(second, kind=0x03)))
    assert len(memory) == RAM_SIZE
    expected = bytearray(RAM_SIZE)
    expected[5 * PAGE : 6 * PAGE] = page(0x5A)
    expected[9 * PAGE : 10 * PAGE] = page(0x07)
    assert memory == bytes(expected)
    assert written >= 3 * PAGE
    # The state: capabilities subsection, addresses in the block list, only the ROM/BIOS records.
    assert state.startswith(header() + b"\x05" + name(b"configuration/capabilities"))
    assert name(b"x-ignore-shared") in state
    assert section_start(BLOCKS, with_address=True) in state
    kept = part(
        record(0, PAGE_FLAG, ROM, page(0xAA)) + record(PAGE, PAGE_FLAG, None, page(0xAB))
    ) + part(record(0, PAGE_FLAG, BIOS, page(0xB1)), kind=0x03)
    assert state.endswith(footer() + kept + DEVICES)
    assert page(0x55) not in state and page(0x5A) not in state


@pytest.mark.parametrize(
    "bad",
    [
        b"QEVM\x00\x00\x00\x02",  # another stream version
        header() + b"\x01" + struct.pack(">I", 2) + name(b"block") + struct.pack(">II", 0, 1),
        build(part(be64(0x40 | 0x0) + b"x")),  # XBZRLE record
        build(part(record(0, PAGE_FLAG, None, page(1)))),  # CONTINUE with no block yet
        build(part(record(0, PAGE_FLAG, RAM, page(1))))[:-40],  # cut short
        header() + b"\x05",  # the configuration already has a subsection
    ],
)
def test_unknown_layouts_are_refused(tmp_path: Path, bad: bytes) -> None:
    with pytest.raises(UnsupportedStream):
        split(tmp_path, bad)


def test_an_out_of_order_zero_run_still_zeroes_a_page_written_before(tmp_path: Path) -> None:
    """A later pass whose zero records are not ascending (10, 3, 12) must not be stepped over as a
    whole: page 3 was written in the first pass and is zero now."""
    first = record(3 * PAGE, PAGE_FLAG, RAM, page(0x33)) + record(4 * PAGE, PAGE_FLAG, None, page(4))
    later = b"".join(record(i * PAGE, ZERO, None, b"\x00") for i in (10, 3, 12))
    memory, _, _ = split(tmp_path, build(part(first), part(later, kind=0x03)))
    assert memory[3 * PAGE : 4 * PAGE] == bytes(PAGE)
    assert memory[4 * PAGE : 5 * PAGE] == page(4)
