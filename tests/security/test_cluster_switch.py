"""Attacks on the cluster switch by a member: frames passing for another member at layer 2 (a
forged Ethernet source MAC, a forged ARP sender MAC), fed as a guest's NIC would feed them to the
link; and one member guest that changes its MAC and sends to another member."""

from __future__ import annotations

import asyncio
import ipaddress
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

import capsa
from capsa import Gateway, NetworkPolicy, VirtualNetwork
from capsa.net.gateway import Gateway as GatewayConfig
from capsa.net.packets import BROADCAST_MAC, ETH_ARP, ETH_IPV4, PROTO_UDP, Arp, Ethernet, IPv4, Udp
from capsa.net.stack import NetworkStack
from capsa.net.switch import Switch

GATEWAY = GatewayConfig("10.0.9.0/24").policy(NetworkPolicy.deny_all()).dns_servers(["127.0.0.1:9"])


@dataclass
class Member:
    stack: NetworkStack
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    @property
    def ip(self) -> ipaddress.IPv4Address:
        return self.stack.guest_ip

    @property
    def mac(self) -> bytes:
        return self.stack.guest_mac

    def send(self, dst_mac: bytes, src_mac: bytes, ethertype: int, payload: bytes) -> None:
        frame = Ethernet.build(dst_mac, src_mac, ethertype, payload)
        self.writer.write(struct.pack("!I", len(frame)) + frame)

    def udp(self, to: Member, data: bytes) -> bytes:
        return IPv4.build(self.ip, to.ip, PROTO_UDP, Udp.build(self.ip, to.ip, 5000, 6000, data))

    async def frames(self, wait: float = 0.4) -> list[Ethernet]:
        """Every frame that reaches this member within ``wait`` seconds."""
        got: list[Ethernet] = []
        try:
            async with asyncio.timeout(wait):
                while True:
                    (length,) = struct.unpack("!I", await self.reader.readexactly(4))
                    got.append(Ethernet.parse(await self.reader.readexactly(length)))
        except TimeoutError:
            return got


@pytest_asyncio.fixture
async def members(tmp_path: Path) -> AsyncIterator[tuple[Switch, Member, Member, Member]]:
    switch = Switch(GATEWAY)
    joined = []
    for index, name in enumerate(("a", "b", "c")):
        address = ipaddress.IPv4Address(f"10.0.9.{index + 2}")
        switch.assign(name, address)
        mac = bytes.fromhex(f"5254000009a{index}")
        stack = NetworkStack(GATEWAY, name, address, switch=switch, name=name, mac=mac)
        await stack.start(tmp_path / f"{name}.sock")
        reader, writer = await asyncio.open_unix_connection(str(tmp_path / f"{name}.sock"))
        joined.append(Member(stack, reader, writer))
    yield switch, joined[0], joined[1], joined[2]
    for member in joined:
        member.writer.close()
        await member.stack.close()


@pytest.mark.asyncio
async def test_a_member_cannot_send_from_another_members_mac(
    members: tuple[Switch, Member, Member, Member],
) -> None:
    """Attack: member a sends IPv4 (from its own address) to b and broadcasts ARP, with c's MAC as
    the Ethernet source, so b takes the frames (and answers them) as c's."""
    switch, a, b, c = members
    a.send(b.mac, c.mac, ETH_IPV4, a.udp(b, b"from c, honest"))
    a.send(BROADCAST_MAC, c.mac, ETH_ARP, Arp(1, a.mac, a.ip, bytes(6), b.ip).build())
    assert await b.frames() == [] and await c.frames() == []
    assert switch.spoofed == 2
    a.send(b.mac, a.mac, ETH_IPV4, a.udp(b, b"really from a"))  # its own MAC still passes
    [got] = await b.frames()
    assert got.src == a.mac and bytes(Udp.parse(IPv4.parse(got.payload)).payload) == b"really from a"


@pytest.mark.asyncio
async def test_an_arp_sender_mac_must_be_the_members_own(
    members: tuple[Switch, Member, Member, Member],
) -> None:
    """Attack: member a answers (and broadcasts gratuitously) that its address is at c's MAC, or at
    the gateway's: b's ARP cache then sends a's traffic where a chose (ARP poisoning at layer 2,
    with an Ethernet source that is a's own)."""
    switch, a, b, c = members
    gateway_mac = bytes.fromhex("525400000002")
    a.send(b.mac, a.mac, ETH_ARP, Arp(2, c.mac, a.ip, b.mac, b.ip).build())
    a.send(BROADCAST_MAC, a.mac, ETH_ARP, Arp(1, gateway_mac, a.ip, bytes(6), a.ip).build())
    a.send(BROADCAST_MAC, a.mac, ETH_ARP, Arp(2, c.mac, a.ip, BROADCAST_MAC, a.ip).build())
    assert await b.frames() == [] and await c.frames() == []
    assert switch.spoofed == 3
    a.send(b.mac, a.mac, ETH_ARP, Arp(2, a.mac, a.ip, b.mac, b.ip).build())  # an honest reply
    [got] = await b.frames()
    assert Arp.parse(got.payload).sender_mac == a.mac


FAKE_MAC = "52:54:00:be:ef:01"
LISTEN = """
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 9999)); s.settimeout(60)
print("ready", flush=True)
print(s.recvfrom(100)[0].decode(), flush=True)
"""
SEND = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(5):
    s.sendto(sys.argv[2].encode(), (sys.argv[1], 9999))
"""


@pytest.mark.vm
@pytest.mark.asyncio
@pytest.mark.timeout(300)
async def test_a_member_guest_that_changes_its_mac_reaches_no_other_member() -> None:
    """Attack: root in member a's guest sets another MAC on eth0 (``ip link set address``), keeps a
    static neighbour entry for b, and sends b datagrams from that MAC; then takes its own MAC back
    and sends again. The first datagram b receives must be one from a's own MAC."""
    net = VirtualNetwork.with_gateway(
        Gateway("10.0.9.0/24").policy(NetworkPolicy.deny_all()).dns_servers(["127.0.0.1:9"])
    )
    async with capsa.cluster(net) as cluster:
        a = await cluster.add("a", capsa.sandbox().memory_mb(256))
        b = await cluster.add("b", capsa.sandbox().memory_mb(256))
        b_ip, b_mac = cluster.address("b"), b.network.identity()["mac"]
        own_mac = a.network.identity()["mac"]
        listener = await b.agent.exec("python3").args(["-c", LISTEN]).spawn()
        assert (await listener.stdout.readline()).strip() == b"ready"
        script = (
            f"ip link set dev eth0 address {FAKE_MAC} && "
            f"ip neigh replace {b_ip} lladdr {b_mac} dev eth0 nud permanent && "
            f'python3 -c "$0" {b_ip} spoofed && '
            f"ip link set dev eth0 address {own_mac} && "
            f'python3 -c "$0" {b_ip} honest'
        )
        sent = await a.agent.exec("sh").args(["-c", script, SEND]).timeout(60).run()
        assert sent.exit_code == 0, sent.stderr
        first = (await listener.stdout.read()).decode().strip()
        assert await listener.wait(timeout=30) == 0
        assert first == "honest"
        assert cluster.spoofed_frames >= 1
