"""The switch joining the links of a cluster's members, in the host process (no TAP, no root).

Every member's stack is a port. A frame to the gateway's MAC, or a broadcast, goes to the gateway's
services for the member that sent it (ARP, DHCP, DNS, the NAT and its policy); a broadcast also goes
to every other member; a frame to a member's MAC goes to that member only. Frames between members
never pass the NAT or the egress policy; they pass the cluster's own rules instead: partitions
(dropped, as a cut cable), pairs blocked by policy (a TCP connect gets an RST, the rest is dropped),
and per-pair delay and loss. A member's MAC is fixed by the cluster: a frame from any other source
MAC is dropped, whoever it is for. Between members only IPv4 and ARP pass, and only from the
sender's own address: the IPv4 source, the ARP sender MAC and IP (no member can pass for another,
nor poison another's ARP cache with a gratuitous ARP for someone else's address). Such frames are
counted in ``spoofed`` and the first of each member is logged. Member frames queue on a link within
the link's bound, and delayed frames within :data:`MAX_DELAYED` bytes per pair, so no member can
make the host hold more.

A standalone VM's stack has a switch with that one port.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
from typing import Protocol

from capsa.net.gateway import Gateway
from capsa.net.link import MAX_BACKLOG, Link
from capsa.net.nat import Decision
from capsa.net.packets import (
    ETH_ARP,
    ETH_IPV4,
    PROTO_TCP,
    TCP_ACK,
    TCP_RST,
    TCP_SYN,
    Arp,
    Ethernet,
    IPv4,
    PacketError,
    Tcp,
)
from capsa.net.tcp import TcpEndpoint

log = logging.getLogger(__name__)

GATEWAY_MAC = bytes.fromhex("525400000002")
MAX_DELAYED = MAX_BACKLOG  # bytes held back by delay() per pair of members


class Port(Protocol):
    """What the switch needs of a member (a :class:`capsa.net.stack.Port`). The switch owns
    this protocol so that it does not import the stack, which creates and joins switches."""

    name: str | None
    guest_mac: bytes
    guest_ip: ipaddress.IPv4Address
    link: Link

    @property
    def fixed_mac(self) -> bool:
        """Whether the member's MAC is fixed (a cluster member's), so another source is spoofed."""
        ...

    def on_gateway_frame(self, eth: Ethernet) -> None:
        """A frame for the gateway, or a broadcast."""
        ...

    def record(self, entry: Decision) -> None:
        """Log an allow/deny decision on the member's own log."""
        ...

    def send_ip(
        self, src: ipaddress.IPv4Address, proto: int, payload: bytes, bounded: bool = True
    ) -> None:
        """One IP packet from ``src`` to the member's guest."""
        ...


def _pair(a: str | None, b: str | None) -> frozenset[str | None]:
    return frozenset((a, b))


class Switch:
    """One L2 segment: member ports, the gateway behind each, and the rules between members."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self._ports: dict[str | None, Port] = {}
        self._names: dict[str, ipaddress.IPv4Address] = {}  # members, also while one is down
        self._groups: list[frozenset[str]] = []
        self._blocked: set[frozenset[str | None]] = set()
        self._delay: dict[frozenset[str | None], float] = {}
        self._loss: dict[frozenset[str | None], float] = {}
        self._delayed: dict[frozenset[str | None], int] = {}
        self.dropped = 0  # frames between members dropped by a partition, loss or a full queue
        self.spoofed = 0  # frames dropped for a source (MAC, IPv4, ARP sender) not the member's own
        self._warned: set[str | None] = set()

    # -- membership --

    def assign(self, name: str, address: ipaddress.IPv4Address | None) -> None:
        """``name`` resolves to ``address`` for every member (the gateway's DNS answers it); None
        forgets the name."""
        if address is None:
            self._names.pop(name, None)
        else:
            self._names[name] = address

    def attach(self, port: Port) -> None:
        old = self._ports.get(port.name)
        if old is not None and old is not port:
            log.debug("member %s re-attached (its previous link is gone)", port.name)
        self._ports[port.name] = port

    def detach(self, port: Port) -> None:
        if self._ports.get(port.name) is port:
            del self._ports[port.name]

    def port(self, name: str) -> Port | None:
        return self._ports.get(name)

    def resolve(self, name: str) -> ipaddress.IPv4Address | None:
        return self._names.get(name)

    def is_member(self, address: ipaddress.IPv4Address) -> bool:
        return address in self._names.values()

    # -- rules --

    def partition(self, *groups: frozenset[str]) -> None:
        self._groups = list(groups)

    def heal(self) -> None:
        """Undo partitions, delays and losses (pairs blocked by policy stay blocked)."""
        self._groups = []
        self._delay.clear()
        self._loss.clear()

    def block(self, a: str, b: str, blocked: bool) -> None:
        if blocked:
            self._blocked.add(_pair(a, b))
        else:
            self._blocked.discard(_pair(a, b))

    def set_delay(self, a: str, b: str, seconds: float) -> None:
        self._delay[_pair(a, b)] = seconds

    def set_loss(self, a: str, b: str, fraction: float) -> None:
        self._loss[_pair(a, b)] = fraction

    def _cut(self, a: str | None, b: str | None) -> bool:
        group_a = next((i for i, g in enumerate(self._groups) if a in g), None)
        group_b = next((i for i, g in enumerate(self._groups) if b in g), None)
        return group_a is not None and group_b is not None and group_a != group_b

    # -- frames --

    def on_frame(self, src: Port, frame: memoryview) -> None:
        try:
            eth = Ethernet.parse(frame)
            if src.fixed_mac and eth.src != src.guest_mac:
                self._spoofed(src, f"source MAC {eth.src.hex(':')}")
                return
            if eth.dst == GATEWAY_MAC or len(self._ports) <= 1:
                src.on_gateway_frame(eth)
                return
            if eth.dst[0] & 1:  # broadcast or multicast: the gateway and every other member
                src.on_gateway_frame(eth)
                if self._from_itself(src, eth):
                    for port in list(self._ports.values()):
                        if port is not src:
                            self._deliver(src, port, eth, frame)
                return
            for port in self._ports.values():
                if port.guest_mac == eth.dst and port is not src:
                    if self._from_itself(src, eth):
                        self._deliver(src, port, eth, frame)
                    return
        except PacketError as exc:
            log.debug("dropped a frame from the guest: %s", exc)

    def _from_itself(self, src: Port, eth: Ethernet) -> bool:
        """Whether a frame for other members may pass: IPv4 or ARP from the sender's own address."""
        if eth.ethertype not in (ETH_IPV4, ETH_ARP):  # IPv6 neighbour discovery and the like
            self.dropped += 1
            return False
        if self._own_address(src, eth):
            return True
        kind = "an ARP packet" if eth.ethertype == ETH_ARP else "an IPv4 packet"
        self._spoofed(src, f"{kind} to members not from its own address")
        return False

    def _deliver(self, src: Port, dst: Port, eth: Ethernet, frame: memoryview) -> None:
        pair = _pair(src.name, dst.name)
        if self._cut(src.name, dst.name):
            self.dropped += 1
            return
        if pair in self._blocked:
            if eth.ethertype == ETH_ARP:
                dst.link.send(bytes(frame))  # so that a connect reaches us and is refused
            elif eth.ethertype == ETH_IPV4:
                self._refuse(src, dst, IPv4.parse(eth.payload))
            return
        loss = self._loss.get(pair, 0.0)
        if loss and random.random() < loss:
            self.dropped += 1
            return
        delay = self._delay.get(pair, 0.0)
        if delay <= 0:
            if not dst.link.send(bytes(frame)):
                self.dropped += 1
            return
        held = self._delayed.get(pair, 0)
        if held + len(frame) > MAX_DELAYED:
            self.dropped += 1
            return
        self._delayed[pair] = held + len(frame)
        data = bytes(frame)

        def later() -> None:
            self._delayed[pair] -= len(data)
            dst.link.send(data)

        asyncio.get_running_loop().call_later(delay, later)

    @staticmethod
    def _own_address(src: Port, eth: Ethernet) -> bool:
        """Members speak to members from their own address only: the IPv4 source; for ARP, a
        request or reply whose sender MAC and IP are the member's own (a gratuitous ARP included)."""
        if eth.ethertype == ETH_IPV4:
            return bytes(eth.payload[12:16]) == src.guest_ip.packed
        arp = Arp.parse(eth.payload)
        return arp.op in (1, 2) and arp.sender_mac == src.guest_mac and arp.sender_ip == src.guest_ip

    def _spoofed(self, src: Port, what: str) -> None:
        """Drop a frame that passes for someone else: counted, and logged once per member (a guest
        could otherwise fill the host's log)."""
        self.dropped += 1
        self.spoofed += 1
        if src.name not in self._warned:
            self._warned.add(src.name)
            log.warning("member %s sent %s: dropped (later ones counted, not logged)", src.name, what)

    def _refuse(self, src: Port, dst: Port, ip: IPv4) -> None:
        """A blocked pair: an RST for a TCP connect (a denial never looks like a hang), logged."""
        if ip.proto != PROTO_TCP:
            return
        tcp = Tcp.parse(ip)
        if tcp.flags & TCP_RST:
            return
        if tcp.flags & TCP_SYN and not tcp.flags & TCP_ACK:
            src.record(("tcp", ip.dst, tcp.dst_port, dst.name, "policy_between", "deny"))
        src.send_ip(ip.dst, PROTO_TCP, TcpEndpoint.refuse(tcp, ip.src, ip.dst))
