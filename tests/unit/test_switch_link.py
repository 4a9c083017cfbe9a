"""The link between the network stack and a guest's NIC: frames queued to a guest that does not read
its link are bounded (ping replies, resets, unreachables, DNS replies), as a full NIC queue drops."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
from pathlib import Path

import pytest

from capsa.net import stack as stack_module
from capsa.net.gateway import Gateway
from capsa.net.packets import ETH_IPV4, PROTO_ICMP, PROTO_TCP, Ethernet, IcmpEcho, IPv4, Tcp
from capsa.net.stack import NetworkStack

pytestmark = pytest.mark.asyncio

GUEST_MAC = bytes.fromhex("525400abcdef")
GATEWAY_MAC = bytes.fromhex("525400000002")
LIMIT = 4 << 20


def _backlog(stack: NetworkStack) -> int:
    """Bytes queued on the stack's side of the link, not yet taken by the guest."""
    link = getattr(stack, "link", None)
    if link is not None:
        return int(link.backlog())
    writer = stack._writer  # type: ignore[attr-defined]
    assert writer is not None
    return int(writer.transport.get_write_buffer_size())


def _frame(payload: bytes) -> bytes:
    frame = Ethernet.build(GATEWAY_MAC, GUEST_MAC, ETH_IPV4, payload)
    return struct.pack("!I", len(frame)) + frame


async def _flood(tmp_path: Path, packet: bytes, count: int) -> int:
    """A guest that sends ``count`` copies of ``packet`` and never reads: the stack's backlog."""
    stack = NetworkStack(Gateway("10.0.2.0/24"))
    path = tmp_path / "net.sock"
    await stack.start(path)
    _reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        for _ in range(count):
            writer.write(_frame(packet))
            await writer.drain()
        await asyncio.sleep(0.5)
        return _backlog(stack)
    finally:
        writer.close()
        await stack.close()


async def test_ping_replies_to_a_guest_that_never_reads_are_bounded(tmp_path: Path) -> None:
    """Attack: a guest pings the gateway with 60 KB echo requests and never reads its link, so the
    host queues every reply in memory without limit."""
    guest, gateway = ipaddress.IPv4Address("10.0.2.2"), ipaddress.IPv4Address("10.0.2.1")
    echo = IcmpEcho.build(8, 7, 1, b"x" * 60_000)
    packet = IPv4.build(guest, gateway, PROTO_ICMP, echo)
    backlog = await _flood(tmp_path, packet, 300)  # 18 MB of replies
    assert backlog <= LIMIT + stack_module.MAX_FRAME


async def test_resets_to_a_guest_that_never_reads_are_bounded(tmp_path: Path) -> None:
    """Attack: a guest sends segments of no connection (each answered by an RST) and never reads."""
    guest, gateway = ipaddress.IPv4Address("10.0.2.2"), ipaddress.IPv4Address("10.0.2.1")
    segment = Tcp.build(guest, gateway, 1234, 80, seq=1, ack=0, flags=0x02, window=1000)
    packet = IPv4.build(guest, gateway, PROTO_TCP, segment)
    backlog = await _flood(tmp_path, packet, 200_000)  # 200k RSTs of 58 bytes: 11 MB
    assert backlog <= LIMIT + stack_module.MAX_FRAME
