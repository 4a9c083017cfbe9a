"""Is a destination one of the host's own addresses?

A guest behind the NAT must not reach services the host binds on ``0.0.0.0`` through an address of
the host itself: eth0's public address, a container bridge, a VPN interface. Those addresses are in
no fixed range, so each destination is asked of the kernel when it is decided, the way ``ip route get
ADDRESS`` does it: an ``RTM_GETROUTE`` lookup over netlink says whether the host would deliver a
packet to that address itself (route type ``local``, or ``broadcast``). That covers every interface,
secondary addresses, ``local`` routes for whole ranges (AnyIP) and policy routing, in the network
namespace the NAT's sockets live in, and it sees an address added or removed at once: there is no
cache to go stale. One lookup costs about 15 µs (a socket, one request, one reply; measured by
``tests/unit/test_host_addresses.py``), once per new flow and per address in a DNS answer.

Where netlink is unavailable, the ``LOCAL`` and ``BROADCAST`` entries of ``/proc/net/fib_trie`` are
read instead (per call as well). If neither can be read, every address counts as the host's own:
the NAT then refuses all destinations unless the gateway allows internal ones, and says why.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import re
import socket
import struct
from pathlib import Path

log = logging.getLogger(__name__)

LOOKUP_TIMEOUT = 1.0  # seconds; the kernel answers a route lookup at once
FIB_TRIE = Path("/proc/net/fib_trie")

_NLMSG = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
# family, dst_len, src_len, tos, table, protocol, scope, type; flags
_RTMSG = struct.Struct("=BBBBBBBBI")
_RTATTR = struct.Struct("=HH")  # length, type
_ERROR = struct.Struct("=i")
NLMSG_ERROR = 2
NLM_F_REQUEST = 1
RTM_NEWROUTE = 24
RTM_GETROUTE = 26
RTA_DST = 1
RTN_LOCAL = 2
RTN_BROADCAST = 3
# A lookup that fails this way means "no route there": such an address is not the host's.
_NO_ROUTE = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EINVAL, errno.EACCES, errno.EAGAIN}

_warned: set[str] = set()  # what was logged once already (a broken lookup is not news twice)


def is_host_address(address: ipaddress.IPv4Address) -> bool:
    """Would the host deliver a packet to ``address`` to itself (any interface, any local route)?"""
    try:
        return _route_is_local(address)
    except OSError as exc:
        _warn_once(
            "netlink", "route lookups over netlink failed (%r); reading %s instead", exc, FIB_TRIE
        )
    try:
        networks = local_networks_from_fib_trie(FIB_TRIE.read_text())
    except OSError as exc:
        _warn_once(
            "fib_trie",
            "cannot tell the host's own addresses (%r): every destination counts as one",
            exc,
        )
        return True
    return any(address in network for network in networks)


def _route_is_local(address: ipaddress.IPv4Address) -> bool:
    sequence = 1  # a socket of its own per lookup: nothing else answers on it
    attribute = _RTATTR.pack(_RTATTR.size + 4, RTA_DST) + address.packed
    body = _RTMSG.pack(socket.AF_INET, 32, 0, 0, 0, 0, 0, 0, 0) + attribute
    header = _NLMSG.pack(_NLMSG.size + len(body), RTM_GETROUTE, NLM_F_REQUEST, sequence, 0)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.settimeout(LOOKUP_TIMEOUT)
        sock.bind((0, 0))
        sock.send(header + body)
        for _ in range(16):  # the answer is the first message; never loop on a confused socket
            answer = _answer(sock.recv(1 << 16), sequence)
            if answer is not None:
                return answer
    raise OSError(errno.EPROTO, "no answer to a netlink route lookup")


def _answer(data: bytes, sequence: int) -> bool | None:
    """The verdict in one netlink datagram, or None when it holds no reply to ``sequence``."""
    offset = 0
    while offset + _NLMSG.size <= len(data):
        length, kind, _, seq, _ = _NLMSG.unpack_from(data, offset)
        if length < _NLMSG.size or offset + length > len(data):
            raise OSError(errno.EPROTO, "malformed netlink reply")
        if seq == sequence:
            if kind == NLMSG_ERROR and length >= _NLMSG.size + _ERROR.size:
                (error,) = _ERROR.unpack_from(data, offset + _NLMSG.size)
                if -error in _NO_ROUTE:
                    return False
                raise OSError(-error, f"netlink route lookup failed: errno {-error}")
            if kind == RTM_NEWROUTE and length >= _NLMSG.size + _RTMSG.size:
                route_type = data[offset + _NLMSG.size + 7]
                return route_type in (RTN_LOCAL, RTN_BROADCAST)
        offset += (length + 3) & ~3
    return None


_LEAF = re.compile(r"^\s*\|--\s+(\d+\.\d+\.\d+\.\d+)\s*$")
_PREFIX = re.compile(r"^\s*/(\d+)\s+\S+\s+([A-Z]+)\s*$")


def local_networks_from_fib_trie(text: str) -> set[ipaddress.IPv4Network]:
    """The ``LOCAL`` and ``BROADCAST`` entries of ``/proc/net/fib_trie`` (every routing table)."""
    networks: set[ipaddress.IPv4Network] = set()
    leaf: str | None = None
    for line in text.splitlines():
        if match := _LEAF.match(line):
            leaf = match.group(1)
        elif (match := _PREFIX.match(line)) and leaf is not None:
            if match.group(2) in ("LOCAL", "BROADCAST"):
                prefix = int(match.group(1))
                networks.add(ipaddress.IPv4Network(f"{leaf}/{prefix}", strict=False))
        elif not line.startswith(" "):
            leaf = None  # a new table
    return networks


def _warn_once(key: str, message: str, *args: object) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message, *args)
