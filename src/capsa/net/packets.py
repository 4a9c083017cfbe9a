"""Parse and build the frames the virtual link carries: Ethernet, ARP, IPv4, UDP, TCP, ICMP.

Parsing works on ``memoryview`` (no copies of payloads) and checks every length against the buffer:
the frames come from the guest, which is hostile. A frame that does not parse raises
:class:`PacketError`; the caller drops it. Building returns ``bytes`` with checksums filled in.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

ETH_IPV4 = 0x0800
ETH_ARP = 0x0806
PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
BROADCAST_MAC = b"\xff" * 6

TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_RST = 0x04
TCP_PSH = 0x08
TCP_ACK = 0x10

_ETH = struct.Struct("!6s6sH")
_ARP = struct.Struct("!HHBBH6s4s6s4s")
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_UDP = struct.Struct("!HHHH")
_TCP = struct.Struct("!HHIIBBHHH")
_ICMP = struct.Struct("!BBHHH")


class PacketError(ValueError):
    """A frame that cannot be parsed; drop it."""


def checksum(data: bytes | memoryview, initial: int = 0) -> int:
    """The Internet checksum (RFC 1071) of ``data``, folded, complemented."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    total = int(initial + sum(struct.unpack(f"!{len(data) // 2}H", data)))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _pseudo_header_sum(src: bytes, dst: bytes, proto: int, length: int) -> int:
    return int(sum(struct.unpack("!HHHH", src + dst))) + proto + length


@dataclass(frozen=True)
class Ethernet:
    dst: bytes
    src: bytes
    ethertype: int
    payload: memoryview

    @classmethod
    def parse(cls, frame: bytes | memoryview) -> Ethernet:
        view = memoryview(frame)
        if len(view) < _ETH.size:
            raise PacketError("short Ethernet frame")
        dst, src, ethertype = _ETH.unpack_from(view)
        return cls(dst, src, ethertype, view[_ETH.size :])

    @staticmethod
    def build(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> bytes:
        return _ETH.pack(dst, src, ethertype) + payload


@dataclass(frozen=True)
class Arp:
    op: int  # 1 request, 2 reply
    sender_mac: bytes
    sender_ip: ipaddress.IPv4Address
    target_mac: bytes
    target_ip: ipaddress.IPv4Address

    @classmethod
    def parse(cls, payload: memoryview) -> Arp:
        if len(payload) < _ARP.size:
            raise PacketError("short ARP packet")
        htype, ptype, hlen, plen, op, smac, sip, tmac, tip = _ARP.unpack_from(payload)
        if (htype, ptype, hlen, plen) != (1, ETH_IPV4, 6, 4):
            raise PacketError("not Ethernet/IPv4 ARP")
        return cls(op, smac, ipaddress.IPv4Address(sip), tmac, ipaddress.IPv4Address(tip))

    def build(self) -> bytes:
        return _ARP.pack(
            1, ETH_IPV4, 6, 4, self.op, self.sender_mac, self.sender_ip.packed,
            self.target_mac, self.target_ip.packed,
        )  # fmt: skip


@dataclass(frozen=True)
class IPv4:
    src: ipaddress.IPv4Address
    dst: ipaddress.IPv4Address
    proto: int
    ttl: int
    ident: int
    payload: memoryview

    @classmethod
    def parse(cls, packet: memoryview) -> IPv4:
        if len(packet) < _IPV4.size:
            raise PacketError("short IPv4 header")
        ver_ihl, _tos, total, ident, frag, ttl, proto, _csum, src, dst = _IPV4.unpack_from(packet)
        ihl = (ver_ihl & 0x0F) * 4
        if ver_ihl >> 4 != 4 or ihl < _IPV4.size or total < ihl or total > len(packet):
            raise PacketError("bad IPv4 header lengths")
        if frag & 0x3FFF:  # more-fragments flag or an offset: the guest's MTU is ours, never needed
            raise PacketError("IPv4 fragments are not supported")
        if checksum(packet[:ihl]) != 0:
            raise PacketError("bad IPv4 header checksum")
        return cls(
            ipaddress.IPv4Address(src), ipaddress.IPv4Address(dst), proto, ttl, ident, packet[ihl:total]
        )

    @staticmethod
    def build(
        src: ipaddress.IPv4Address,
        dst: ipaddress.IPv4Address,
        proto: int,
        payload: bytes,
        ident: int = 0,
    ) -> bytes:
        header = _IPV4.pack(0x45, 0, _IPV4.size + len(payload), ident & 0xFFFF, 0x4000, 64, proto, 0,
                            src.packed, dst.packed)  # fmt: skip
        csum = checksum(header)
        return header[:10] + struct.pack("!H", csum) + header[12:] + payload


@dataclass(frozen=True)
class Udp:
    src_port: int
    dst_port: int
    payload: memoryview

    @classmethod
    def parse(cls, ip: IPv4) -> Udp:
        data = ip.payload
        if len(data) < _UDP.size:
            raise PacketError("short UDP header")
        sport, dport, length, csum = _UDP.unpack_from(data)
        if length < _UDP.size or length > len(data):
            raise PacketError("bad UDP length")
        if csum and checksum(
            data[:length], _pseudo_header_sum(ip.src.packed, ip.dst.packed, PROTO_UDP, length)
        ):
            raise PacketError("bad UDP checksum")
        return cls(sport, dport, data[_UDP.size : length])

    @staticmethod
    def build(
        src: ipaddress.IPv4Address, dst: ipaddress.IPv4Address, sport: int, dport: int, payload: bytes
    ) -> bytes:
        length = _UDP.size + len(payload)
        segment = _UDP.pack(sport, dport, length, 0) + payload
        csum = checksum(segment, _pseudo_header_sum(src.packed, dst.packed, PROTO_UDP, length)) or 0xFFFF
        return segment[:6] + struct.pack("!H", csum) + segment[8:]


@dataclass(frozen=True)
class Tcp:
    src_port: int
    dst_port: int
    seq: int
    ack: int
    flags: int
    window: int
    mss: int | None
    wscale: int | None
    payload: memoryview

    @classmethod
    def parse(cls, ip: IPv4) -> Tcp:
        data = ip.payload
        if len(data) < _TCP.size:
            raise PacketError("short TCP header")
        sport, dport, seq, ack, offset, flags, window, _csum, _urg = _TCP.unpack_from(data)
        header_len = (offset >> 4) * 4
        if header_len < _TCP.size or header_len > len(data):
            raise PacketError("bad TCP header length")
        if checksum(data, _pseudo_header_sum(ip.src.packed, ip.dst.packed, PROTO_TCP, len(data))):
            raise PacketError("bad TCP checksum")
        mss, wscale = _tcp_options(data[_TCP.size : header_len])
        return cls(sport, dport, seq, ack, flags, window, mss, wscale, data[header_len:])

    @staticmethod
    def build(
        src: ipaddress.IPv4Address,
        dst: ipaddress.IPv4Address,
        sport: int,
        dport: int,
        *,
        seq: int,
        ack: int,
        flags: int,
        window: int,
        payload: bytes = b"",
        mss: int | None = None,
        wscale: int | None = None,
    ) -> bytes:
        options = b""
        if mss is not None:
            options += struct.pack("!BBH", 2, 4, mss)
        if wscale is not None:
            options += struct.pack("!BBBB", 1, 3, 3, wscale)  # NOP + window scale
        header_len = _TCP.size + len(options)
        offset = (header_len // 4) << 4
        header = _TCP.pack(sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, offset, flags, window, 0, 0)
        header += options
        segment = header + payload
        csum = checksum(segment, _pseudo_header_sum(src.packed, dst.packed, PROTO_TCP, len(segment)))
        return segment[:16] + struct.pack("!H", csum) + segment[18:]


def _tcp_options(options: memoryview) -> tuple[int | None, int | None]:
    mss = wscale = None
    i = 0
    while i < len(options):
        kind = options[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        if i + 1 >= len(options) or options[i + 1] < 2 or i + options[i + 1] > len(options):
            raise PacketError("malformed TCP options")
        length = options[i + 1]
        if kind == 2 and length == 4:
            mss = struct.unpack_from("!H", options, i + 2)[0]
        elif kind == 3 and length == 3:
            wscale = min(options[i + 2], 14)
        i += length
    return mss, wscale


@dataclass(frozen=True)
class IcmpEcho:
    kind: int  # 8 request, 0 reply
    ident: int
    seq: int
    payload: memoryview

    @classmethod
    def parse(cls, ip: IPv4) -> IcmpEcho:
        data = ip.payload
        if len(data) < _ICMP.size:
            raise PacketError("short ICMP header")
        if checksum(data):
            raise PacketError("bad ICMP checksum")
        kind, code, _csum, ident, seq = _ICMP.unpack_from(data)
        if kind not in (0, 8) or code != 0:
            raise PacketError("not an ICMP echo")
        return cls(kind, ident, seq, data[_ICMP.size :])

    @staticmethod
    def build(kind: int, ident: int, seq: int, payload: bytes) -> bytes:
        body = _ICMP.pack(kind, 0, 0, ident, seq) + payload
        return body[:2] + struct.pack("!H", checksum(body)) + body[4:]


def icmp_unreachable(original_ip_packet: bytes | memoryview, code: int = 3) -> bytes:
    """ICMP destination unreachable (default: port unreachable) quoting the offending packet."""
    quoted = bytes(original_ip_packet[:28])
    body = struct.pack("!BBHI", 3, code, 0, 0) + quoted
    return body[:2] + struct.pack("!H", checksum(body)) + body[4:]
