"""Decoding tar headers from hostile layers: ustar / GNU / PAX fields, with Go's ``archive/tar`` rules.

Docker and containerd read layers with Go's ``archive/tar``, so a layer means what Go makes of it:
one zero block followed by a header is an error (two end the archive, one then the end of the input
is a clean end), PAX global headers (``g``) are read but ignored, an empty PAX value removes the
record, numbers are plain decimal (PAX) or octal / base-256 (header fields) within 64 bits, and a
name or link target may not hold a NUL byte.

On top of that, everything a hostile header can make us keep in memory or hand to ``tar2sqfs`` is
bounded (see the ``MAX_*`` limits): an extended header's size and record count, name and link target
lengths, extended attributes (those the squashfs format cannot store are dropped, as Docker drops
what its filesystem refuses), uids and gids. Any violation raises :class:`TarError`.
"""

from __future__ import annotations

import logging
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

BLOCK = 512
ZERO = bytes(BLOCK)
MAX_META = 1 << 20  # a PAX or GNU long-name header's data (Go's limit too): names, xattrs, no file data
MAX_PAX_RECORDS = 4096  # per extended header; a real one has a dozen
MAX_NAME = 8192  # bytes of a name or link target as stored (2 x PATH_MAX: "./" prefixes are cleaned)
XATTR_NAME_MAX = 255  # the kernel's limit on an attribute name
MAX_XATTR_BYTES = 48 << 10  # their PAX records per entry: tar2sqfs reads at most 64 KiB of PAX
MAX_ID = (1 << 32) - 2  # uid / gid: 32 bits, and (uid_t)-1 means "unchanged" to chown(2)
_INT64 = 1 << 63
_XATTR = (b"SCHILY.xattr.", b"LIBARCHIVE.xattr.")
_STORABLE = (b"user.", b"trusted.", b"security.")  # the xattr namespaces squashfs stores

REG, LNK, SYM, CHR, BLK, DIR, FIFO = b"0", b"1", b"2", b"3", b"4", b"5", b"6"
_REGULAR = (b"0", b"\0", b"7")  # regular, old-style regular, contiguous
BUILTIN = (b"0", b"\0", b"7", b"1", b"2", b"3", b"4", b"5", b"6")
_PAX_TYPES = (b"x", b"g", b"X")
_GNU_LONG = (b"L", b"K")
_GNU_SPARSE = b"S"
_PAX_INT = re.compile(rb"-?[0-9]{1,19}")  # Go: strconv.ParseInt(v, 10, 64)
_PAX_TIME = re.compile(rb"(-?[0-9]{1,19})(?:\.[0-9]*)?")  # Go: seconds, optional fraction


class TarError(Exception):
    """The layer is not a readable tar (or its compression is corrupt, or it breaks a limit)."""


@dataclass
class Member:
    """The fields of one tar entry the merge uses (``type`` is normalised: regular is ``b"0"``)."""

    name: str
    type: bytes
    mode: int
    uid: int
    gid: int
    size: int
    mtime: int
    linkname: str
    xattrs: dict[str, bytes] = field(default_factory=dict)  # PAX keys kept verbatim
    devmajor: int = 0  # read for device nodes only (the importer drops them; a capture keeps
    devminor: int = 0  # the 0/0 character device, an overlayfs whiteout)

    def isreg(self) -> bool:
        return self.type == REG


def decode(raw: bytes) -> str:
    """Names are bytes to the kernel: undecodable bytes survive the round trip (surrogateescape)."""
    return raw.decode("utf-8", "surrogateescape")


def encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _nts(raw: bytes) -> bytes:
    end = raw.find(b"\0")
    return raw if end < 0 else raw[:end]


def number(raw: bytes) -> int:
    """A numeric header field: octal (NUL / space padded) or GNU base-256, within 64 bits."""
    text = raw.partition(b"\0")[0]
    if text.isdigit():  # the common case (int() alone would take a sign, "_" or spaces)
        try:
            return int(text, 8)
        except ValueError:
            raise TarError(f"invalid number field {raw!r}") from None
    if raw[0] & 0x80:  # base-256: the bits after the first are a two's complement number
        bits = 8 * len(raw) - 1
        value = int.from_bytes(raw, "big") & ((1 << bits) - 1)
        if raw[0] & 0x40:
            value -= 1 << bits
        if not -_INT64 <= value < _INT64:
            raise TarError(f"a number field over 64 bits: {raw!r}")
        return value
    text = _nts(raw.strip(b" \0"))  # Go trims NULs and spaces around the digits
    if not text:
        return 0
    if not text.isdigit():
        raise TarError(f"invalid number field {raw!r}")
    try:
        return int(text, 8)
    except ValueError:
        raise TarError(f"invalid number field {raw!r}") from None


_FIELDS = struct.Struct("100s8s8s8s12s12s8sc100s6s2s32s32s8s8s155s12x")


def parse(header: bytes) -> Member:
    """One 512-byte header block (checksum checked), before any PAX / GNU extension applies."""
    (name, mode, uid, gid, size, mtime, chksum, kind, link, magic, _, _, _, major, minor, prefix) = (
        _FIELDS.unpack(header)
    )
    stored = number(chksum)
    computed = sum(header) - sum(chksum) + 256
    if stored != computed:
        high = sum(1 for b in header[:148] + header[156:] if b > 127)
        if stored != computed - 256 * high:  # old tars summed signed chars
            raise TarError("invalid header (bad checksum)")
    name = _nts(name)
    if magic == b"ustar\0" and prefix[0]:  # POSIX: a prefix extends the name (GNU uses the field)
        name = _nts(prefix) + b"/" + name
    member = Member(
        name=decode(name),
        type=kind,
        mode=number(mode),
        uid=number(uid),
        gid=number(gid),
        size=number(size),
        mtime=number(mtime),
        linkname=decode(_nts(link)),
    )
    if kind in (CHR, BLK):
        member.devmajor, member.devminor = number(major), number(minor)
    return member


def pax_records(data: bytes) -> dict[bytes, bytes]:
    """The records of a PAX header (``"%d %s=%s\\n"``); an empty value deletes the key (as Go)."""
    records: dict[bytes, bytes] = {}
    pos = count = 0
    while pos < len(data) and data[pos] != 0:
        count += 1
        if count > MAX_PAX_RECORDS:
            raise TarError(f"a PAX header with over {MAX_PAX_RECORDS} records: not a sane layer")
        space = data.find(b" ", pos, pos + 20)
        if space < 0 or not data[pos:space].isdigit():
            raise TarError("invalid PAX header")
        length = int(data[pos:space])
        end = pos + length
        if length < 5 or end > len(data) or data[end - 1 : end] != b"\n":
            raise TarError("invalid PAX header")
        key, sep, value = data[space + 1 : end - 1].partition(b"=")
        if not sep or not key:
            raise TarError("invalid PAX header")
        if value:
            records[key] = value
        else:
            records.pop(key, None)
        pos = end
    return records


def _pax_int(key: bytes, value: bytes, pattern: re.Pattern[bytes] = _PAX_INT) -> int:
    """Go's ParseInt rules: no ``inf``, ``nan``, exponent, sign or space tricks (``float()`` took
    them all), 64 bits at most; a time keeps its seconds."""
    match = pattern.fullmatch(value)
    if match is None:
        raise TarError(f"invalid PAX value {decode(key)}={value[:40]!r}")
    result = int(match.group(1) if pattern.groups else match.group(0))
    if not -_INT64 <= result < _INT64:
        raise TarError(f"PAX value {decode(key)}={value[:40]!r} is over 64 bits")
    return result


def _name(raw: bytes, what: str) -> str:
    if len(raw) > MAX_NAME:
        raise TarError(f"a {len(raw)}-byte {what} (the kernel's PATH_MAX is 4096)")
    if b"\0" in raw:
        raise TarError(f"a {what} with a NUL byte: {raw[:80]!r}")
    return decode(raw)


def _apply_pax(member: Member, pax: dict[bytes, bytes]) -> None:
    xattr_bytes = 0
    for key, value in pax.items():
        if key == b"path":
            member.name = _name(value, "path")
        elif key == b"linkpath":
            member.linkname = _name(value, "link target")
        elif key == b"size":
            member.size = _pax_int(key, value)
        elif key == b"uid":
            member.uid = _pax_int(key, value)
        elif key == b"gid":
            member.gid = _pax_int(key, value)
        elif key == b"mtime":
            member.mtime = _pax_int(key, value, _PAX_TIME)
        elif key.startswith(_XATTR):
            attr = key.partition(b".xattr.")[2]
            if len(attr) > XATTR_NAME_MAX or not attr or b"\0" in attr:
                raise TarError(f"extended attribute name {attr[:80]!r} of {member.name!r} is invalid")
            xattr_bytes += len(key) + len(value) + 10  # as a record in our own header
            if xattr_bytes > MAX_XATTR_BYTES:
                raise TarError(
                    f"{member.name!r} has over {MAX_XATTR_BYTES >> 10} KiB of extended attributes"
                )
            if attr.startswith(_STORABLE):
                member.xattrs[decode(key)] = value
            else:  # system.posix_acl_*, ...: Docker ignores what the filesystem refuses (ENOTSUP)
                log.debug("dropping extended attribute %r of %r", attr, member.name)


def _check(member: Member) -> None:
    if member.size < 0:
        raise TarError(f"negative size for {member.name!r}")
    if not (0 <= member.uid <= MAX_ID and 0 <= member.gid <= MAX_ID):
        raise TarError(f"uid/gid {member.uid}/{member.gid} of {member.name!r} out of range")


Block = Callable[[], "bytes | None"]  # the next 512-byte block; None at a clean end of the input
Meta = Callable[[int], bytes]  # the data of a meta entry of that size (padding consumed)


def next_member(block: Block, meta: Meta) -> Member | None:
    """The next real entry, with its PAX / GNU extensions applied; None at the end of the archive.

    The caller then reads or skips ``data_size(member)`` bytes (plus padding) of data."""
    pax: dict[bytes, bytes] = {}
    long_name: bytes | None = None
    long_link: bytes | None = None
    pending = False
    while True:
        header = block()
        if header is None or header == ZERO:
            after = None if header is None else block()
            if after is not None and after != ZERO:
                raise TarError("a zero block followed by another header (Go's archive/tar refuses it)")
            if pending:
                raise TarError("the layer ends after an extended header")
            return None
        member = parse(header)
        kind = member.type
        if kind in _PAX_TYPES or kind in _GNU_LONG:
            if not 0 <= member.size <= MAX_META:
                raise TarError(f"a {member.size}-byte extended header (over {MAX_META})")
            data = meta(member.size)
            pending = True
            if kind in {b"x", b"X"}:
                pax.update(pax_records(data))
            elif kind == b"g":
                pax_records(data)  # checked, then ignored: Docker skips global headers
            elif kind == b"L":
                long_name = _nts(data)
            else:
                long_link = _nts(data)
            continue
        if kind == _GNU_SPARSE or (pax and any(k.startswith(b"GNU.sparse.") for k in pax)):
            raise TarError(f"sparse file {member.name!r}: not supported in image layers")
        if long_name is not None:
            member.name = _name(long_name, "path")
        if long_link is not None:
            member.linkname = _name(long_link, "link target")
        if pax:
            _apply_pax(member, pax)
        _check(member)
        if kind in _REGULAR:
            member.type = DIR if kind == b"\0" and member.name.endswith("/") else REG
        return member


def data_size(member: Member) -> int:
    """The data (with padding) that follows ``member``'s header in the archive."""
    if member.type == REG or member.type not in BUILTIN:
        return member.size + (-member.size % BLOCK)
    return 0
