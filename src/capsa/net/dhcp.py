"""The gateway's DHCP server: one guest per virtual link, so one lease, handed out at once.

Parses BOOTP/DHCP requests from the guest (hostile: every length checked) and answers DISCOVER with
OFFER and REQUEST with ACK (or NAK for an address that is not the guest's). Options sent: subnet mask,
router, DNS server (the gateway itself), lease time, MTU.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from capsa.net.packets import PacketError

DISCOVER, OFFER, REQUEST, DECLINE, ACK, NAK, RELEASE = 1, 2, 3, 4, 5, 6, 7
MAGIC = b"\x63\x82\x53\x63"
_BOOTP = struct.Struct("!BBBBIHH4s4s4s4s16s64s128s")
OPT_SUBNET, OPT_ROUTER, OPT_DNS, OPT_HOSTNAME, OPT_MTU = 1, 3, 6, 12, 26
OPT_REQUESTED_IP, OPT_LEASE, OPT_MSG_TYPE, OPT_SERVER_ID, OPT_END = 50, 51, 53, 54, 255
LEASE_SECONDS = 86400


@dataclass(frozen=True)
class DhcpRequest:
    xid: int
    client_mac: bytes
    message_type: int
    requested_ip: ipaddress.IPv4Address | None
    flags: int

    @classmethod
    def parse(cls, payload: bytes | memoryview) -> DhcpRequest:
        data = memoryview(payload)
        if len(data) < _BOOTP.size + len(MAGIC):
            raise PacketError("short DHCP packet")
        op, htype, hlen, _hops, xid, _secs, flags, *_addrs, chaddr, _sname, _file = _BOOTP.unpack_from(
            data
        )
        if op != 1 or htype != 1 or hlen != 6 or bytes(data[_BOOTP.size : _BOOTP.size + 4]) != MAGIC:
            raise PacketError("not a DHCP request from an Ethernet client")
        options = _options(data[_BOOTP.size + 4 :])
        kind = options.get(OPT_MSG_TYPE)
        if not kind or len(kind) != 1:
            raise PacketError("DHCP request without a message type")
        requested = options.get(OPT_REQUESTED_IP)
        return cls(
            xid,
            bytes(chaddr[:6]),
            kind[0],
            ipaddress.IPv4Address(requested) if requested and len(requested) == 4 else None,
            flags,
        )


def _options(data: memoryview) -> dict[int, bytes]:
    options: dict[int, bytes] = {}
    i = 0
    while i < len(data):
        code = data[i]
        if code == OPT_END:
            break
        if code == 0:
            i += 1
            continue
        if i + 1 >= len(data) or i + 2 + data[i + 1] > len(data):
            raise PacketError("truncated DHCP option")
        length = data[i + 1]
        options[code] = bytes(data[i + 2 : i + 2 + length])
        i += 2 + length
    return options


@dataclass(frozen=True)
class DhcpServer:
    """The lease for the one guest on this link."""

    gateway: ipaddress.IPv4Address
    guest: ipaddress.IPv4Address
    network: ipaddress.IPv4Network
    mtu: int = 1500
    hostname: str | None = None

    def answer(self, request: DhcpRequest) -> bytes | None:
        """The reply payload (for UDP 67 → 68), or ``None`` when nothing is to be said."""
        if request.message_type == DISCOVER:
            return self._reply(request, OFFER)
        if request.message_type == REQUEST:
            wanted = request.requested_ip
            if wanted is not None and wanted != self.guest:
                return self._reply(request, NAK)
            return self._reply(request, ACK)
        return None  # DECLINE, RELEASE, INFORM: nothing to do for a single-lease link

    def _reply(self, request: DhcpRequest, kind: int) -> bytes:
        yiaddr = self.guest.packed if kind != NAK else b"\0\0\0\0"
        header = _BOOTP.pack(
            2, 1, 6, 0, request.xid, 0, request.flags, b"\0" * 4, yiaddr, self.gateway.packed,
            b"\0" * 4, request.client_mac.ljust(16, b"\0"), b"\0" * 64, b"\0" * 128,
        )  # fmt: skip
        options = bytes([OPT_MSG_TYPE, 1, kind]) + bytes([OPT_SERVER_ID, 4]) + self.gateway.packed
        if kind != NAK:
            options += bytes([OPT_SUBNET, 4]) + self.network.netmask.packed
            options += bytes([OPT_ROUTER, 4]) + self.gateway.packed
            options += bytes([OPT_DNS, 4]) + self.gateway.packed
            options += bytes([OPT_LEASE, 4]) + struct.pack("!I", LEASE_SECONDS)
            options += bytes([OPT_MTU, 2]) + struct.pack("!H", self.mtu)
            if self.hostname:
                name = self.hostname.encode()[:63]
                options += bytes([OPT_HOSTNAME, len(name)]) + name
        return header + MAGIC + options + bytes([OPT_END])
