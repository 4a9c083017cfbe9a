"""A restored guest takes the link identity its host network stack expects: eth0's MAC, address and
default route. Plain ioctls, because running iproute2 costs ~200 ms under TCG on every networked
restore; each call is a no-op when the value is already right (a template restore keeps the usual
address)."""

from __future__ import annotations

import errno
import fcntl
import socket
import struct
from typing import NamedTuple

from capsa.agent.guest.sessions import BadRequest

_SIOCADDRT = 0x890B
_SIOCSIFADDR = 0x8916
_SIOCSIFNETMASK = 0x891C
_SIOCSIFHWADDR = 0x8924
_ARPHRD_ETHER = 1
_RTF_UP_GATEWAY = 0x1 | 0x2
_RTENTRY_SIZE = 120  # struct rtentry on 64-bit Linux
_IFNAME = b"eth0"


def _sockaddr_in(address: bytes) -> bytes:
    return struct.pack("=HH4s8x", socket.AF_INET, 0, address)


def _ifreq(payload: bytes) -> bytes:
    return struct.pack("16s24s", _IFNAME, payload)


class LinkIdentity(NamedTuple):
    hw: bytes  # the MAC, 6 bytes
    ip: bytes  # the address, 4 bytes
    prefix: int
    gateway: bytes


def parse_link_identity(network: object) -> LinkIdentity:
    """The ``network`` argument of ``refresh``, checked whole before anything is changed."""
    if not isinstance(network, dict):
        raise BadRequest("'network' must be a map")
    mac, address, gateway = (network.get(key) for key in ("mac", "address", "gateway"))
    bad = BadRequest("'network' needs 'mac', 'address' (ip/prefix) and 'gateway'")
    if not (isinstance(mac, str) and isinstance(address, str) and isinstance(gateway, str)):
        raise bad
    if max(len(mac), len(address), len(gateway)) > 64 or "\0" in mac + address + gateway:
        raise bad
    ip, _, prefix = address.partition("/")
    try:
        hw = bytes.fromhex(mac.replace(":", ""))
        bits = int(prefix)
        ip4, gw4 = socket.inet_aton(ip), socket.inet_aton(gateway)
    except (ValueError, OSError):
        raise bad from None
    if len(hw) != 6 or not 8 <= bits <= 30:
        raise bad
    return LinkIdentity(hw, ip4, bits, gw4)


def take_link_identity(link: LinkIdentity) -> None:
    mask = struct.pack("!I", (0xFFFFFFFF << (32 - link.prefix)) & 0xFFFFFFFF)
    route = struct.pack(
        "@L16s16s16sHh", 0, _sockaddr_in(bytes(4)), _sockaddr_in(link.gateway),
        _sockaddr_in(bytes(4)), _RTF_UP_GATEWAY, 0,
    ).ljust(_RTENTRY_SIZE, b"\0")  # fmt: skip
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            fcntl.ioctl(sock, _SIOCSIFHWADDR, _ifreq(struct.pack("H14s", _ARPHRD_ETHER, link.hw)))
            fcntl.ioctl(sock, _SIOCSIFADDR, _ifreq(_sockaddr_in(link.ip)))
            fcntl.ioctl(sock, _SIOCSIFNETMASK, _ifreq(_sockaddr_in(mask)))
        except OSError as exc:
            raise BadRequest(f"cannot configure eth0: {exc.strerror}") from None
        try:  # a changed address took the routes with it; an unchanged one kept them
            fcntl.ioctl(sock, _SIOCADDRT, route)
        except OSError as exc:
            if exc.errno != errno.EEXIST:
                raise BadRequest(f"cannot add the default route: {exc.strerror}") from None
