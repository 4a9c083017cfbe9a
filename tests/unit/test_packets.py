"""Frame parsing and building for the virtual link (Ethernet, ARP, IPv4, UDP, TCP, ICMP, DHCP)."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv4Network

import pytest

from capsa.net import dhcp
from capsa.net.packets import (
    ETH_ARP,
    ETH_IPV4,
    PROTO_TCP,
    PROTO_UDP,
    TCP_ACK,
    TCP_SYN,
    Arp,
    Ethernet,
    IcmpEcho,
    IPv4,
    PacketError,
    Tcp,
    Udp,
    checksum,
    icmp_unreachable,
)

GUEST, GATEWAY = IPv4Address("10.0.2.15"), IPv4Address("10.0.2.2")
GUEST_MAC, GW_MAC = bytes.fromhex("525400123456"), bytes.fromhex("525400000002")


def test_checksum_matches_the_rfc_1071_example() -> None:
    data = bytes.fromhex("0001f203f4f5f6f7")
    assert checksum(data) == ~0xDDF2 & 0xFFFF  # the RFC's folded sum is 0xddf2


def test_udp_round_trip_through_ethernet_and_ipv4() -> None:
    udp = Udp.build(GUEST, GATEWAY, 40000, 53, b"question")
    frame = Ethernet.build(
        GW_MAC, GUEST_MAC, ETH_IPV4, IPv4.build(GUEST, GATEWAY, PROTO_UDP, udp, ident=7)
    )
    eth = Ethernet.parse(frame)
    ip = IPv4.parse(eth.payload)
    parsed = Udp.parse(ip)
    assert (eth.src, ip.src, ip.dst, ip.proto, ip.ident) == (GUEST_MAC, GUEST, GATEWAY, PROTO_UDP, 7)
    assert (parsed.src_port, parsed.dst_port, bytes(parsed.payload)) == (40000, 53, b"question")


def test_tcp_round_trip_with_options() -> None:
    segment = Tcp.build(GUEST, GATEWAY, 50000, 443, seq=1, ack=0, flags=TCP_SYN, window=64240,
                        mss=1460, wscale=7)  # fmt: skip
    tcp = Tcp.parse(IPv4.parse(memoryview(IPv4.build(GUEST, GATEWAY, PROTO_TCP, segment))))
    assert (tcp.flags, tcp.seq, tcp.mss, tcp.wscale, tcp.window) == (TCP_SYN, 1, 1460, 7, 64240)
    data = Tcp.build(GUEST, GATEWAY, 50000, 443, seq=2, ack=9, flags=TCP_ACK, window=100, payload=b"hi")
    parsed = Tcp.parse(IPv4.parse(memoryview(IPv4.build(GUEST, GATEWAY, PROTO_TCP, data))))
    assert bytes(parsed.payload) == b"hi" and parsed.mss is None


def test_arp_and_icmp() -> None:
    request = Arp(1, GUEST_MAC, GUEST, b"\0" * 6, GATEWAY)
    assert Arp.parse(memoryview(request.build())) == request
    echo = IcmpEcho.build(8, 1, 2, b"ping")
    ip = IPv4.parse(memoryview(IPv4.build(GUEST, GATEWAY, 1, echo)))
    parsed = IcmpEcho.parse(ip)
    assert (parsed.kind, parsed.ident, parsed.seq, bytes(parsed.payload)) == (8, 1, 2, b"ping")
    assert checksum(icmp_unreachable(IPv4.build(GUEST, GATEWAY, PROTO_UDP, b"x" * 30))) == 0
    assert ETH_ARP == 0x0806


@pytest.mark.parametrize(
    "mangle",
    [
        lambda p: p[:10],  # truncated header
        lambda p: p[:10] + b"\x00\x00" + p[12:],  # wrong header checksum
        lambda p: b"\x46" + p[1:],  # IHL says options that are not there
        lambda p: p[:2] + struct.pack("!H", 2000) + p[4:],  # total length beyond the buffer
        lambda p: p[:6] + b"\x20\x00" + p[8:],  # a fragment
    ],
)
def test_hostile_ipv4_is_rejected(mangle: object) -> None:
    packet = IPv4.build(GUEST, GATEWAY, PROTO_UDP, Udp.build(GUEST, GATEWAY, 1, 2, b"x"))
    with pytest.raises(PacketError):
        IPv4.parse(memoryview(mangle(packet)))  # type: ignore[operator]


def test_hostile_tcp_and_udp_are_rejected() -> None:
    good = Tcp.build(GUEST, GATEWAY, 1, 2, seq=0, ack=0, flags=TCP_SYN, window=1)
    bad_options = good[:12] + bytes([0x60]) + good[13:] + b"\x02\x09\x00\x00"  # option length runs out
    for segment, kind in ((good[:14] + b"\xff" + good[15:], Tcp), (bad_options, Tcp)):
        ip = IPv4.parse(memoryview(IPv4.build(GUEST, GATEWAY, PROTO_TCP, segment)))
        with pytest.raises(PacketError):
            kind.parse(ip)
    udp = Udp.build(GUEST, GATEWAY, 1, 2, b"abc")
    corrupt = udp[:-1] + b"d"
    with pytest.raises(PacketError):
        Udp.parse(IPv4.parse(memoryview(IPv4.build(GUEST, GATEWAY, PROTO_UDP, corrupt))))


def _dhcp_request(kind: int, requested: IPv4Address | None = None) -> bytes:
    header = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 1, 1, 6, 0, 0xABCD, 0, 0x8000, b"\0" * 4,
                         b"\0" * 4, b"\0" * 4, b"\0" * 4, GUEST_MAC.ljust(16, b"\0"), b"\0" * 64, b"\0" * 128)  # fmt: skip
    options = bytes([53, 1, kind]) + (bytes([50, 4]) + requested.packed if requested else b"") + b"\xff"
    return header + dhcp.MAGIC + options


def test_dhcp_offer_ack_and_nak() -> None:
    server = dhcp.DhcpServer(GATEWAY, GUEST, IPv4Network("10.0.2.0/24"), mtu=1500, hostname="capsa-x")
    offer = server.answer(dhcp.DhcpRequest.parse(_dhcp_request(dhcp.DISCOVER)))
    assert offer is not None and offer[16:20] == GUEST.packed  # yiaddr
    assert bytes([53, 1, dhcp.OFFER]) in offer and bytes([6, 4]) + GATEWAY.packed in offer
    ack = server.answer(dhcp.DhcpRequest.parse(_dhcp_request(dhcp.REQUEST, GUEST)))
    assert ack is not None and bytes([53, 1, dhcp.ACK]) in ack
    nak = server.answer(dhcp.DhcpRequest.parse(_dhcp_request(dhcp.REQUEST, IPv4Address("10.0.2.99"))))
    assert nak is not None and bytes([53, 1, dhcp.NAK]) in nak
    with pytest.raises(PacketError):
        dhcp.DhcpRequest.parse(_dhcp_request(dhcp.DISCOVER)[:-3] + b"\x35\x05")  # truncated option
