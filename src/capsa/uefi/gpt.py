"""Just enough of the GUID Partition Table (UEFI spec §5) to write a one-partition disk and to find
the EFI System Partition of an existing one, in pure Python (no root, no loop devices, no sgdisk)."""

from __future__ import annotations

import struct
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

SECTOR = 512
ESP_TYPE = uuid.UUID("c12a7328-f81f-11d2-ba4b-00a0c93ec93b")
MBR_ESP_TYPE = 0xEF
MBR_PROTECTIVE_TYPE = 0xEE
_SIGNATURE = b"EFI PART"
_REVISION = 0x00010000
_HEADER_SIZE = 92
_ENTRIES = 128
_ENTRY_SIZE = 128
_ENTRY_SECTORS = _ENTRIES * _ENTRY_SIZE // SECTOR  # 32
# Header fields after the signature: revision, size, crc, reserved, my LBA, alternate LBA, first and
# last usable LBA, disk GUID, entries LBA, entry count, entry size, entries CRC.
_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")
_ENTRY = struct.Struct("<16s16sQQQ72s")
HEAD_BYTES = SECTOR * (2 + _ENTRY_SECTORS)  # protective MBR, header, entry array


@dataclass(frozen=True)
class Partition:
    type_guid: uuid.UUID
    first_lba: int
    last_lba: int  # inclusive
    name: str

    @property
    def is_esp(self) -> bool:
        return self.type_guid == ESP_TYPE


@dataclass(frozen=True)
class PartitionTable:
    scheme: str  # "gpt", "mbr" or "none"
    partitions: tuple[Partition, ...]

    @property
    def esp(self) -> Partition | None:
        return next((p for p in self.partitions if p.is_esp), None)


def _header(
    *, my_lba: int, alternate: int, last_usable: int, disk_guid: uuid.UUID, entries_lba: int,
    entries_crc: int,
) -> bytes:  # fmt: skip
    def pack(crc: int) -> bytes:
        return _HEADER.pack(
            _SIGNATURE, _REVISION, _HEADER_SIZE, crc, 0, my_lba, alternate, 2 + _ENTRY_SECTORS,
            last_usable, disk_guid.bytes_le, entries_lba, _ENTRIES, _ENTRY_SIZE, entries_crc,
        )  # fmt: skip

    return pack(zlib.crc32(pack(0))).ljust(SECTOR, b"\0")


def _protective_mbr(total_sectors: int) -> bytes:
    mbr = bytearray(SECTOR)
    size = min(total_sectors - 1, 0xFFFFFFFF)
    mbr[446:462] = struct.pack(
        "<B3sB3sII", 0, b"\x00\x02\x00", MBR_PROTECTIVE_TYPE, b"\xff\xff\xff", 1, size
    )
    mbr[510:512] = b"\x55\xaa"
    return bytes(mbr)


def write_gpt(fh: BinaryIO, total_bytes: int, partitions: list[Partition]) -> None:
    """Write a protective MBR, the primary and backup GPT for ``partitions`` into ``fh`` (a file of
    ``total_bytes``, a multiple of 512). Partition data is not touched."""
    if total_bytes % SECTOR:
        raise ValueError("disk size must be a multiple of 512")
    total = total_bytes // SECTOR
    last = total - 1
    first_usable, last_usable = 2 + _ENTRY_SECTORS, last - 1 - _ENTRY_SECTORS
    entries = bytearray(_ENTRIES * _ENTRY_SIZE)
    for index, part in enumerate(partitions):
        if not first_usable <= part.first_lba <= part.last_lba <= last_usable:
            raise ValueError(f"partition {part.name!r} lies outside the usable area")
        name = part.name.encode("utf-16-le")[:72]
        entries[index * _ENTRY_SIZE : (index + 1) * _ENTRY_SIZE] = _ENTRY.pack(
            part.type_guid.bytes_le, uuid.uuid4().bytes_le, part.first_lba, part.last_lba, 0, name
        )
    entries_crc = zlib.crc32(entries)
    disk_guid = uuid.uuid4()
    common = {"last_usable": last_usable, "disk_guid": disk_guid, "entries_crc": entries_crc}
    fh.seek(0)
    fh.write(_protective_mbr(total))
    fh.write(_header(my_lba=1, alternate=last, entries_lba=2, **common))  # type: ignore[arg-type]
    fh.write(entries)
    fh.seek((last - _ENTRY_SECTORS) * SECTOR)
    fh.write(entries)
    backup = _header(my_lba=last, alternate=1, entries_lba=last - _ENTRY_SECTORS, **common)  # type: ignore[arg-type]
    fh.write(backup)


def parse_head(head: bytes) -> PartitionTable:
    """The partition table in the first :data:`HEAD_BYTES` of a disk (primary GPT, else MBR).
    A GPT whose header or entry checksums do not match counts as no GPT."""
    if len(head) < 2 * SECTOR or head[510:512] != b"\x55\xaa":
        return PartitionTable("none", ())
    fields = _HEADER.unpack_from(head, SECTOR) if len(head) >= SECTOR + _HEADER.size else None
    if fields is not None and fields[0] == _SIGNATURE:
        table = _parse_gpt(head, fields)
        if table is not None:
            return table
    parts = []
    for index in range(4):
        kind, start, count = struct.unpack_from("<4xB3xII", head, 446 + 16 * index)
        if kind == MBR_ESP_TYPE and count:
            parts.append(Partition(ESP_TYPE, start, start + count - 1, f"mbr{index + 1}"))
        elif kind and count:
            parts.append(Partition(uuid.UUID(int=kind), start, start + count - 1, f"mbr{index + 1}"))
    if any(p.type_guid == uuid.UUID(int=MBR_PROTECTIVE_TYPE) for p in parts):
        return PartitionTable("none", ())  # protective MBR but no valid GPT
    return PartitionTable("mbr" if parts else "none", tuple(parts))


def _parse_gpt(head: bytes, fields: tuple[object, ...]) -> PartitionTable | None:
    size, crc, entries_lba, count, entry_size, entries_crc = (
        fields[2], fields[3], fields[10], fields[11], fields[12], fields[13]
    )  # fmt: skip
    assert isinstance(size, int) and isinstance(entries_lba, int)
    assert isinstance(count, int) and isinstance(entry_size, int)
    if not _HEADER_SIZE <= size <= SECTOR:
        return None
    raw = bytearray(head[SECTOR : SECTOR + size])
    raw[16:20] = b"\0\0\0\0"
    if zlib.crc32(raw) != crc or entry_size < _ENTRY.size:
        return None
    start, length = entries_lba * SECTOR, count * entry_size
    array = head[start : start + length]
    if len(array) != length:
        # Entries beyond what we read: still trust the header; read what is there.
        array = array[: len(array) // entry_size * entry_size]
    elif zlib.crc32(array) != entries_crc:
        return None
    parts = []
    for offset in range(0, len(array), entry_size):
        type_bytes, _, first, last, _, name = _ENTRY.unpack_from(array, offset)
        if type_bytes == bytes(16):
            continue
        label = name.decode("utf-16-le", errors="replace").rstrip("\0")
        parts.append(Partition(uuid.UUID(bytes_le=type_bytes), first, last, label))
    return PartitionTable("gpt", tuple(parts))


def read_table(path: Path) -> PartitionTable:
    """The partition table of a raw disk image."""
    with path.open("rb") as fh:
        return parse_head(fh.read(HEAD_BYTES))
