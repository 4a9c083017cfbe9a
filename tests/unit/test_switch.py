"""The cluster switch with fake guests on the link sockets (as QEMU would connect): switching between
members, names answered by the gateway's DNS before the policy, partitions, blocked pairs, delay,
loss; and the cluster's bad input."""

from __future__ import annotations

import asyncio
import ipaddress
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
from dnslib import DNSRecord

import capsa
from capsa.net import link
from capsa.net.gateway import Gateway
from capsa.net.packets import (
    BROADCAST_MAC,
    ETH_ARP,
    ETH_IPV4,
    PROTO_TCP,
    PROTO_UDP,
    TCP_RST,
    Arp,
    Ethernet,
    IPv4,
    Tcp,
    Udp,
)
from capsa.net.policy import NetworkPolicy
from capsa.net.stack import GATEWAY_MAC, NetworkStack
from capsa.net.switch import Switch

pytestmark = pytest.mark.asyncio

GATEWAY = Gateway("10.0.7.0/24").policy(NetworkPolicy.deny_all()).dns_servers(["127.0.0.1:9"])


@dataclass
class Guest:
    stack: NetworkStack
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    @property
    def ip(self) -> ipaddress.IPv4Address:
        return self.stack.guest_ip

    @property
    def mac(self) -> bytes:
        return self.stack.guest_mac

    def send(self, dst_mac: bytes, ethertype: int, payload: bytes) -> None:
        frame = Ethernet.build(dst_mac, self.mac, ethertype, payload)
        self.writer.write(struct.pack("!I", len(frame)) + frame)

    def send_ip(self, dst_mac: bytes, dst: ipaddress.IPv4Address, proto: int, payload: bytes) -> None:
        self.send(dst_mac, ETH_IPV4, IPv4.build(self.ip, dst, proto, payload))

    async def frame(self, timeout: float = 1.0) -> Ethernet:
        async with asyncio.timeout(timeout):
            (length,) = struct.unpack("!I", await self.reader.readexactly(4))
            return Ethernet.parse(await self.reader.readexactly(length))

    async def nothing(self, wait: float = 0.3) -> bool:
        try:
            await self.frame(wait)
        except TimeoutError:
            return True
        return False


@pytest_asyncio.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[Switch, Guest, Guest]]:
    switch = Switch(GATEWAY)
    guests = []
    for index, name in enumerate(("a", "b")):
        address = ipaddress.IPv4Address(f"10.0.7.{index + 2}")
        switch.assign(name, address)
        mac = bytes.fromhex(f"5254000000a{index}")
        stack = NetworkStack(GATEWAY, name, address, switch=switch, name=name, mac=mac)
        await stack.start(tmp_path / f"{name}.sock")
        reader, writer = await asyncio.open_unix_connection(str(tmp_path / f"{name}.sock"))
        guests.append(Guest(stack, reader, writer))
    yield switch, guests[0], guests[1]
    for guest in guests:
        guest.writer.close()
        await guest.stack.close()


def _syn(src: Guest, dst: ipaddress.IPv4Address, port: int) -> bytes:
    return Tcp.build(src.ip, dst, 40000, port, seq=1000, ack=0, flags=0x02, window=1000)


async def test_frames_between_members_are_switched_by_mac(pair: tuple[Switch, Guest, Guest]) -> None:
    _, a, b = pair
    a.send_ip(b.mac, b.ip, PROTO_TCP, _syn(a, b.ip, 80))
    got = await b.frame()
    assert got.src == a.mac and got.dst == b.mac
    assert IPv4.parse(got.payload).dst == b.ip
    assert await a.nothing()  # no RST from the gateway: the NAT never saw it
    assert not a.stack.log()  # nor the policy


async def test_an_arp_broadcast_reaches_the_other_member_and_the_gateway_stays_quiet(
    pair: tuple[Switch, Guest, Guest],
) -> None:
    _, a, b = pair
    a.send(BROADCAST_MAC, ETH_ARP, Arp(1, a.mac, a.ip, bytes(6), b.ip).build())
    got = await b.frame()
    assert got.ethertype == ETH_ARP and Arp.parse(got.payload).target_ip == b.ip
    assert await a.nothing()  # the gateway does not answer for a member
    a.send(BROADCAST_MAC, ETH_ARP, Arp(1, a.mac, a.ip, bytes(6), GATEWAY.gateway_ip).build())
    reply = await a.frame()
    assert Arp.parse(reply.payload).sender_mac == GATEWAY_MAC


async def test_member_names_resolve_before_a_deny_all_policy(pair: tuple[Switch, Guest, Guest]) -> None:
    _, a, b = pair
    question = DNSRecord.question("b").pack()
    a.send_ip(GATEWAY_MAC, GATEWAY.gateway_ip, PROTO_UDP,
              Udp.build(a.ip, GATEWAY.gateway_ip, 5353, 53, question))  # fmt: skip
    reply = await a.frame()
    answer = DNSRecord.parse(bytes(Udp.parse(IPv4.parse(reply.payload)).payload))
    assert [str(r.rdata) for r in answer.rr] == [str(b.ip)]
    other = DNSRecord.question("example.com").pack()
    a.send_ip(GATEWAY_MAC, GATEWAY.gateway_ip, PROTO_UDP,
              Udp.build(a.ip, GATEWAY.gateway_ip, 5353, 53, other))  # fmt: skip
    denied = DNSRecord.parse(bytes(Udp.parse(IPv4.parse((await a.frame()).payload)).payload))
    assert denied.header.rcode == 3  # NXDOMAIN by the policy
    assert [(e.domain, e.rule, e.member) for e in a.stack.log()] == [
        ("b", "cluster member", "a"),
        ("example.com", "default deny", "a"),
    ]


async def test_a_partition_drops_and_heal_restores(pair: tuple[Switch, Guest, Guest]) -> None:
    switch, a, b = pair
    switch.partition(frozenset({"a"}), frozenset({"b"}))
    a.send_ip(b.mac, b.ip, PROTO_TCP, _syn(a, b.ip, 80))
    a.send(BROADCAST_MAC, ETH_ARP, Arp(1, a.mac, a.ip, bytes(6), b.ip).build())
    assert await b.nothing()
    switch.heal()
    a.send_ip(b.mac, b.ip, PROTO_TCP, _syn(a, b.ip, 80))
    assert (await b.frame()).src == a.mac


async def test_a_blocked_pair_gets_an_rst_and_a_log_entry(pair: tuple[Switch, Guest, Guest]) -> None:
    switch, a, b = pair
    switch.block("a", "b", blocked=True)
    a.send_ip(b.mac, b.ip, PROTO_TCP, _syn(a, b.ip, 80))
    reply = await a.frame()
    ip = IPv4.parse(reply.payload)
    assert ip.src == b.ip and Tcp.parse(ip).flags & TCP_RST
    assert await b.nothing()
    (entry,) = a.stack.log()
    assert (entry.action, entry.rule, entry.domain, entry.member) == ("deny", "policy_between", "b", "a")
    switch.block("a", "b", blocked=False)
    a.send_ip(b.mac, b.ip, PROTO_TCP, _syn(a, b.ip, 80))
    assert (await b.frame()).src == a.mac


async def test_delay_and_loss(pair: tuple[Switch, Guest, Guest]) -> None:
    switch, a, b = pair
    switch.set_delay("a", "b", 0.2)
    started = time.monotonic()
    a.send_ip(b.mac, b.ip, PROTO_TCP, _syn(a, b.ip, 80))
    await b.frame()
    assert time.monotonic() - started >= 0.19
    switch.set_delay("a", "b", 0)
    switch.set_loss("a", "b", 1.0)
    a.send_ip(b.mac, b.ip, PROTO_TCP, _syn(a, b.ip, 80))
    assert await b.nothing()
    switch.set_delay("a", "b", 5.0)
    switch.heal()  # undoes delay and loss
    a.send_ip(b.mac, b.ip, PROTO_TCP, _syn(a, b.ip, 80))
    assert (await b.frame(0.5)).src == a.mac


async def test_bad_cluster_input_is_a_config_error() -> None:
    net = capsa.VirtualNetwork.with_gateway(Gateway("10.0.7.0/30"))
    with pytest.raises(capsa.ConfigError):
        capsa.cluster("10.0.7.0/24")  # type: ignore[arg-type]
    with pytest.raises(capsa.ConfigError):
        capsa.cluster(capsa.VirtualNetwork.with_gateway(Gateway().forward_tcp(0, 80)))
    c = capsa.cluster(net)
    with pytest.raises(capsa.ConfigError, match="async with"):
        await c.add("db", capsa.sandbox())  # not entered yet
    async with c:
        for bad in ("", "-db", "db_1", "a" * 64, "db.local", 7):
            with pytest.raises(capsa.ConfigError, match="hostname"):
                await c.add(bad, capsa.sandbox())  # type: ignore[arg-type]
        with pytest.raises(capsa.ConfigError):
            await c.add("db", "capsa.sandbox()")  # type: ignore[arg-type]
        c._reserve("db")  # a /30 holds one member
        with pytest.raises(capsa.ConfigError, match="already has a member"):
            await c.add("DB", capsa.sandbox())
        with pytest.raises(capsa.ConfigError, match="no address left"):
            await c.add("app", capsa.sandbox())
        with pytest.raises(capsa.ConfigError, match="no member"):
            c.partition({"db"}, {"nobody"})
    with pytest.raises(capsa.ConfigError, match="stopped"):
        await c.add("late", capsa.sandbox())


async def test_a_member_flooding_one_that_does_not_read_is_bounded(
    pair: tuple[Switch, Guest, Guest],
) -> None:
    """Attack: member a floods member b, which never reads its link, so that the host queues every
    frame in its own memory. Frames past the link's bound are dropped, as by a full NIC queue."""
    switch, a, b = pair
    payload = Udp.build(a.ip, b.ip, 1, 2, b"x" * 60_000)
    for _ in range(300):  # 18 MB
        a.send_ip(b.mac, b.ip, PROTO_UDP, payload)
        await a.writer.drain()
    await asyncio.sleep(0.5)
    assert b.stack.link.backlog() <= link.MAX_BACKLOG + link.MAX_FRAME
    assert switch.dropped > 0


async def test_a_member_cannot_pass_for_another(pair: tuple[Switch, Guest, Guest]) -> None:
    """Attack: member a sends frames with another address as their source (IPv4, ARP), to be taken
    for someone else by member b."""
    _, a, b = pair
    forged = ipaddress.IPv4Address("10.0.7.9")
    segment = Tcp.build(forged, b.ip, 40000, 80, seq=1, ack=0, flags=0x02, window=1000)
    a.send(b.mac, ETH_IPV4, IPv4.build(forged, b.ip, PROTO_TCP, segment))
    a.send(BROADCAST_MAC, ETH_ARP, Arp(1, a.mac, forged, bytes(6), b.ip).build())
    assert await b.nothing()


async def test_only_forgeries_count_as_spoofed(pair: tuple[Switch, Guest, Guest]) -> None:
    """A gratuitous ARP for b's address is a forgery (dropped and counted); IPv6 between members is
    dropped too, but is what every Linux guest sends (neighbour discovery), so it is no forgery."""
    switch, a, b = pair
    a.send(BROADCAST_MAC, ETH_ARP, Arp(2, a.mac, b.ip, BROADCAST_MAC, b.ip).build())
    a.send(BROADCAST_MAC, ETH_ARP, Arp(7, a.mac, a.ip, bytes(6), b.ip).build())  # no such opcode
    a.send(bytes.fromhex("333300000001"), 0x86DD, bytes(48))
    assert await b.nothing()
    assert (switch.spoofed, switch.dropped) == (2, 3)
    a.send(BROADCAST_MAC, ETH_ARP, Arp(1, a.mac, a.ip, a.mac, a.ip).build())  # its own: passes
    assert Arp.parse((await b.frame()).payload).sender_ip == a.ip
