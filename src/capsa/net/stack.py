"""The userspace network behind one VM's NIC: QEMU's ``-netdev stream`` connects to a unix socket
served here (4-byte big-endian length per Ethernet frame). The stack answers ARP, DHCP, DNS and ping
for the gateway, and NATs TCP and UDP to host sockets after the policy allowed each flow.

Bounded per VM: at most :data:`MAX_FLOWS` TCP and UDP flows, a receive window per TCP flow, an egress
log of :data:`MAX_LOG` entries. A denied TCP connect gets an RST at once, denied UDP an ICMP
unreachable: a denial never looks like a hang.

Port forwards run the other way: a host connection or datagram reaches a guest port and appears to
come from the gateway's address, on a gateway port of its own (see :mod:`capsa.net.forward`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import ipaddress
import logging
import os
import secrets
import struct
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from capsa.net.dhcp import DhcpRequest, DhcpServer
from capsa.net.dns import DnsEvent, DnsProxy, LoopbackMap, PinTable
from capsa.net.forward import ForwardedPort, HostAddress, UdpForward, UdpPeer, listen_tcp, listen_udp
from capsa.net.gateway import Gateway
from capsa.net.packets import (
    BROADCAST_MAC,
    ETH_ARP,
    ETH_IPV4,
    PROTO_ICMP,
    PROTO_TCP,
    PROTO_UDP,
    TCP_SYN,
    Arp,
    Ethernet,
    IcmpEcho,
    IPv4,
    PacketError,
    Tcp,
    Udp,
    icmp_unreachable,
)
from capsa.net.policy import Flow, is_internal
from capsa.net.tcp import State, TcpEndpoint

log = logging.getLogger(__name__)

MAX_FRAME = 65535 + 14
MAX_FLOWS = 512
MAX_LOG = 10_000
CONNECT_TIMEOUT = 10.0
UDP_IDLE = 60.0
OUTBOUND_HIGH = 256 << 10  # host bytes queued for the guest before we stop reading the host socket
GATEWAY_MAC = bytes.fromhex("525400000002")
GATEWAY_PORTS = range(40000, 60000)  # the gateway's source ports for forwarded connections


@dataclass(frozen=True)
class LogEntry:
    time: float
    proto: str
    dst_ip: str
    dst_port: int | None
    domain: str | None
    rule: str
    action: str  # "allow" or "deny"


class _TcpFlow:
    def __init__(self, stack: NetworkStack, endpoint: TcpEndpoint) -> None:
        self.stack = stack
        self.ep = endpoint
        self.writer: asyncio.StreamWriter | None = None
        self.inbound_ready = asyncio.Event()
        self.outbound_room = asyncio.Event()
        self.answered = asyncio.Event()  # the guest answered a forward's SYN (SYN-ACK or RST)
        self.tasks: list[asyncio.Task[None]] = []

    def start(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.tasks = [
            asyncio.ensure_future(self._to_host()),
            asyncio.ensure_future(self._from_host(reader)),
        ]

    async def _to_host(self) -> None:
        assert self.writer is not None
        try:
            while True:
                chunk, update = self.ep.take_inbound(1 << 16)
                for segment in update:
                    self.stack._send_ip(self.ep.remote_ip, PROTO_TCP, segment)
                if chunk:
                    self.writer.write(chunk)
                    await self.writer.drain()
                    continue
                if self.ep.guest_fin:
                    with contextlib.suppress(OSError):
                        self.writer.write_eof()
                    return
                self.inbound_ready.clear()
                await self.inbound_ready.wait()
        except (ConnectionError, OSError):
            self.abort()

    async def _from_host(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                while len(self.ep.outbound) > OUTBOUND_HIGH:
                    self.outbound_room.clear()
                    await self.outbound_room.wait()
                data = await reader.read(1 << 16)
                segments = self.ep.send(data) if data else self.ep.close()
                for segment in segments:
                    self.stack._send_ip(self.ep.remote_ip, PROTO_TCP, segment)
                if not data:
                    return
        except (ConnectionError, OSError):
            self.abort()

    def on_guest_segment(self, tcp: Tcp) -> None:
        for segment in self.ep.on_segment(tcp):
            self.stack._send_ip(self.ep.remote_ip, PROTO_TCP, segment)
        if self.ep.state is not State.SYN_SENT:
            self.answered.set()
        self.inbound_ready.set()
        self.outbound_room.set()
        if self.ep.closed:
            self.close()

    def abort(self) -> None:
        if not self.ep.closed:
            self.stack._send_ip(self.ep.remote_ip, PROTO_TCP, self.ep.reset())
        self.close()

    def close(self) -> None:
        self.stack._tcp.pop((self.ep.guest_port, self.ep.remote_ip, self.ep.remote_port), None)
        for task in self.tasks:
            if task is not asyncio.current_task():
                task.cancel()
        if self.writer is not None:
            self.writer.close()


class _UdpFlow(asyncio.DatagramProtocol):
    def __init__(self, stack: NetworkStack, key: tuple[int, ipaddress.IPv4Address, int]) -> None:
        self.stack = stack
        self.key = key
        self.transport: asyncio.DatagramTransport | None = None
        self.last = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio's selector datagram transport does not subclass DatagramTransport on 3.11
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        guest_port, remote_ip, remote_port = self.key
        self.last = time.monotonic()
        segment = Udp.build(remote_ip, self.stack.guest_ip, remote_port, guest_port, data[:65000])
        self.stack._send_ip(remote_ip, PROTO_UDP, segment)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class NetworkStack:
    """One VM's network. ``start(path)`` listens on the unix socket QEMU will connect to."""

    def __init__(
        self,
        gateway: Gateway,
        hostname: str = "capsa",
        guest_ip: ipaddress.IPv4Address | None = None,
    ) -> None:
        self.gateway = gateway
        self.guest_ip = gateway.guest_ip if guest_ip is None else guest_ip
        self.guest_mac = bytes.fromhex("525400") + secrets.token_bytes(3)
        self._pins = PinTable()
        self._loopback = LoopbackMap()
        self._log: collections.deque[LogEntry] = collections.deque(maxlen=MAX_LOG)
        self._dns = DnsProxy(
            gateway.policy_value, gateway.upstreams(), self._pins,
            allow_internal=gateway.internal_allowed, on_event=self._dns_event, loopback=self._loopback,
        )  # fmt: skip
        self._dhcp = DhcpServer(gateway.gateway_ip, self.guest_ip, gateway.network, hostname=hostname)
        self._tcp: dict[tuple[int, ipaddress.IPv4Address, int], _TcpFlow] = {}
        self._udp: dict[tuple[int, ipaddress.IPv4Address, int], _UdpFlow] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._ident = 0
        self._forwarded: list[ForwardedPort] = []
        self._tcp_listeners: list[asyncio.AbstractServer] = []
        self._udp_listeners: list[UdpForward] = []
        self._udp_peers: dict[int, UdpPeer] = {}  # by gateway port
        self._next_gateway_port = GATEWAY_PORTS.start

    # -- public --

    def log(self) -> list[LogEntry]:
        """Every allow/deny decision so far (the newest :data:`MAX_LOG`)."""
        return list(self._log)

    def identity(self) -> dict[str, str]:
        """The guest's link identity for a restored guest's agent to take on (MAC, address, route):
        the snapshot carries the identity of the VM it was taken from."""
        mac = ":".join(f"{b:02x}" for b in self.guest_mac)
        address = f"{self.guest_ip}/{self.gateway.network.prefixlen}"
        return {"mac": mac, "address": address, "gateway": str(self.gateway.gateway_ip)}

    def forwards(self) -> list[ForwardedPort]:
        """The port forwards as bound on the host (with the real port where 0 was asked for)."""
        return list(self._forwarded)

    async def start(self, path: Path) -> None:
        """Bind the port forwards (``ConfigError`` if a host port is taken), then listen for QEMU."""
        try:
            for forward in self.gateway.forwards:
                if forward.proto == "tcp":
                    accept = functools.partial(self._forward_tcp, forward.guest_port)
                    server, bound = await listen_tcp(forward, accept)
                    self._tcp_listeners.append(server)
                else:
                    endpoint, bound = await listen_udp(forward, self._from_udp_forward)
                    self._udp_listeners.append(endpoint)
                self._forwarded.append(bound)
        except BaseException:
            await self.close()
            raise
        self._server = await asyncio.start_unix_server(self._serve, path=str(path), limit=MAX_FRAME * 4)
        os.chmod(path, 0o600)

    async def close(self) -> None:
        for listener in self._tcp_listeners:
            listener.close()
        for endpoint in self._udp_listeners:
            endpoint.close()
        self._udp_peers.clear()
        for flow in list(self._tcp.values()):
            flow.close()
        for udp in list(self._udp.values()):
            udp.close()
        self._udp.clear()
        for task in list(self._tasks):
            task.cancel()
        if self._writer is not None:
            self._writer.close()
        if self._server is not None:
            self._server.close()
        await asyncio.sleep(0)  # datagram transports release their sockets on the next loop turn

    # -- the link --

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._writer is not None:  # one QEMU per stack
            writer.close()
            return
        self._writer = writer
        self._spawn(self._reap_udp())
        try:
            while True:
                header = await reader.readexactly(4)
                (length,) = struct.unpack("!I", header)
                if length > MAX_FRAME:
                    log.warning("guest sent a %d-byte frame; dropping the link", length)
                    return
                frame = await reader.readexactly(length)
                try:
                    self._on_frame(memoryview(frame))
                except PacketError as exc:
                    log.debug("dropped a frame from the guest: %s", exc)
        except (asyncio.IncompleteReadError, ConnectionError):
            return

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _send_frame(self, dst_mac: bytes, ethertype: int, payload: bytes) -> None:
        if self._writer is None or self._writer.is_closing():
            return
        frame = Ethernet.build(dst_mac, GATEWAY_MAC, ethertype, payload)
        self._writer.write(struct.pack("!I", len(frame)) + frame)

    def _send_ip(
        self, src: ipaddress.IPv4Address, proto: int, payload: bytes, dst_mac: bytes | None = None
    ) -> None:
        self._ident = (self._ident + 1) & 0xFFFF
        packet = IPv4.build(src, self.guest_ip, proto, payload, ident=self._ident)
        self._send_frame(dst_mac or self.guest_mac, ETH_IPV4, packet)

    def _on_frame(self, frame: memoryview) -> None:
        eth = Ethernet.parse(frame)
        if eth.ethertype == ETH_ARP:
            self._on_arp(Arp.parse(eth.payload))
        elif eth.ethertype == ETH_IPV4:
            self.guest_mac = eth.src
            self._on_ip(IPv4.parse(eth.payload))

    def _on_arp(self, arp: Arp) -> None:
        if arp.op != 1 or arp.target_ip == arp.sender_ip or arp.target_ip not in self.gateway.network:
            return
        if arp.target_ip == self.guest_ip:
            return
        self.guest_mac = arp.sender_mac
        reply = Arp(2, GATEWAY_MAC, arp.target_ip, arp.sender_mac, arp.sender_ip)
        self._send_frame(arp.sender_mac, ETH_ARP, reply.build())

    def _on_ip(self, ip: IPv4) -> None:
        gateway = self.gateway.gateway_ip
        if ip.proto == PROTO_UDP:
            udp = Udp.parse(ip)
            if udp.dst_port == 67:
                self._on_dhcp(udp)
            elif ip.dst == gateway and udp.dst_port == 53:
                self._spawn(self._on_dns(udp))
            elif ip.dst == gateway:
                self._to_udp_forward(udp)
            else:
                self._on_udp_out(ip, udp)
        elif ip.proto == PROTO_TCP:
            tcp = Tcp.parse(ip)
            flow = self._tcp.get((tcp.src_port, ip.dst, tcp.dst_port))
            if flow is not None:
                flow.on_guest_segment(tcp)
            elif ip.dst == gateway:
                if not tcp.flags & 0x04:  # nothing listens on the gateway; never answer an RST
                    self._send_ip(ip.dst, PROTO_TCP, TcpEndpoint.refuse(tcp, self.guest_ip, ip.dst))
            else:
                self._on_tcp_out(ip, tcp)
        elif ip.proto == PROTO_ICMP and ip.dst == gateway:
            echo = IcmpEcho.parse(ip)
            if echo.kind == 8:
                self._send_ip(
                    gateway, PROTO_ICMP, IcmpEcho.build(0, echo.ident, echo.seq, bytes(echo.payload))
                )

    # -- gateway services --

    def _on_dhcp(self, udp: Udp) -> None:
        request = DhcpRequest.parse(udp.payload)
        answer = self._dhcp.answer(request)
        if answer is None:
            return
        self.guest_mac = request.client_mac
        segment = Udp.build(
            self.gateway.gateway_ip, ipaddress.IPv4Address("255.255.255.255"), 67, 68, answer
        )
        packet = IPv4.build(
            self.gateway.gateway_ip, ipaddress.IPv4Address("255.255.255.255"), PROTO_UDP, segment
        )
        self._send_frame(BROADCAST_MAC, ETH_IPV4, packet)

    async def _on_dns(self, udp: Udp) -> None:
        reply = await self._dns.handle(bytes(udp.payload))
        if reply is not None:
            gateway = self.gateway.gateway_ip
            self._send_ip(gateway, PROTO_UDP, Udp.build(gateway, self.guest_ip, 53, udp.src_port, reply))

    def _dns_event(self, event: DnsEvent) -> None:
        self._record(("dns", self.gateway.gateway_ip, 53, event.name, event.rule, event.action))

    # -- NAT --

    def _decide(self, proto: str, dst: ipaddress.IPv4Address, port: int) -> tuple[bool, str, str | None]:
        """``dst`` as the guest sees it: pins are kept that way; IP rules see the real host address."""
        names = self._pins.names_for(dst)
        domain = min(names) if names else None
        real = self._loopback.host_address(dst)
        if is_internal(real) and not self.gateway.internal_allowed:
            return False, "internal destination", domain
        if real != dst and not names:
            return False, "stand-in address never resolved", domain
        decision = self.gateway.policy_value.decide(Flow(proto, real, port, names))  # type: ignore[arg-type]
        return decision.allowed, decision.rule, domain

    def _record(
        self, entry: tuple[str, ipaddress.IPv4Address, int | None, str | None, str, str]
    ) -> None:
        proto, dst, port, domain, rule, action = entry
        self._log.append(LogEntry(time.time(), proto, str(dst), port, domain, rule, action))

    def _on_tcp_out(self, ip: IPv4, tcp: Tcp) -> None:
        key = (tcp.src_port, ip.dst, tcp.dst_port)
        if not tcp.flags & TCP_SYN or tcp.flags & 0x10:  # not a fresh SYN: nothing to continue
            if not tcp.flags & 0x04:
                self._send_ip(ip.dst, PROTO_TCP, TcpEndpoint.refuse(tcp, self.guest_ip, ip.dst))
            return
        allowed, rule, domain = self._decide("tcp", ip.dst, tcp.dst_port)
        self._record(("tcp", ip.dst, tcp.dst_port, domain, rule, "allow" if allowed else "deny"))
        if not allowed or len(self._tcp) >= MAX_FLOWS:
            self._send_ip(ip.dst, PROTO_TCP, TcpEndpoint.refuse(tcp, self.guest_ip, ip.dst))
            return
        endpoint = TcpEndpoint.accept(tcp, self.guest_ip, ip.dst, secrets.randbits(32))
        flow = _TcpFlow(self, endpoint)
        self._tcp[key] = flow
        self._spawn(self._connect(flow, tcp))

    async def _connect(self, flow: _TcpFlow, syn: Tcp) -> None:
        ep = flow.ep
        try:
            host = self._loopback.host_address(ep.remote_ip)
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(str(host), ep.remote_port), CONNECT_TIMEOUT
            )
        except (OSError, TimeoutError):
            self._tcp.pop((ep.guest_port, ep.remote_ip, ep.remote_port), None)
            self._send_ip(ep.remote_ip, PROTO_TCP, TcpEndpoint.refuse(syn, self.guest_ip, ep.remote_ip))
            return
        flow.start(reader, writer)
        self._send_ip(ep.remote_ip, PROTO_TCP, ep.syn_ack())

    def _on_udp_out(self, ip: IPv4, udp: Udp) -> None:
        key = (udp.src_port, ip.dst, udp.dst_port)
        flow = self._udp.get(key)
        if flow is None:
            allowed, rule, domain = self._decide("udp", ip.dst, udp.dst_port)
            self._record(("udp", ip.dst, udp.dst_port, domain, rule, "allow" if allowed else "deny"))
            if not allowed or len(self._udp) >= MAX_FLOWS:
                quoted = Udp.build(self.guest_ip, ip.dst, udp.src_port, udp.dst_port, bytes(udp.payload))
                raw = IPv4.build(self.guest_ip, ip.dst, PROTO_UDP, quoted)
                self._send_ip(self.gateway.gateway_ip, PROTO_ICMP, icmp_unreachable(raw))
                return
            flow = _UdpFlow(self, key)
            self._udp[key] = flow
            self._spawn(self._open_udp(flow, bytes(udp.payload)))
            return
        if flow.transport is not None:
            flow.last = time.monotonic()
            flow.transport.sendto(bytes(udp.payload))

    async def _open_udp(self, flow: _UdpFlow, first: bytes) -> None:
        _, remote_ip, remote_port = flow.key
        loop = asyncio.get_running_loop()
        try:
            host = self._loopback.host_address(remote_ip)
            transport, _ = await loop.create_datagram_endpoint(
                lambda: flow, remote_addr=(str(host), remote_port)
            )
        except OSError:
            self._udp.pop(flow.key, None)
            return
        flow.transport = transport
        transport.sendto(first)

    async def _reap_udp(self) -> None:
        while True:
            await asyncio.sleep(UDP_IDLE / 4)
            now = time.monotonic()
            for key, flow in list(self._udp.items()):
                if now - flow.last > UDP_IDLE:
                    flow.close()
                    self._udp.pop(key, None)
            for port, peer in list(self._udp_peers.items()):
                if now - peer.last > UDP_IDLE:
                    del self._udp_peers[port]
                    peer.forward.peers.pop(peer.address, None)

    # -- port forwards --

    def _gateway_port(self) -> int | None:
        """A gateway port no forwarded TCP connection or UDP peer uses (None: all taken)."""
        gateway = self.gateway.gateway_ip
        used = {key[2] for key in self._tcp if key[1] == gateway} | self._udp_peers.keys()
        for _ in range(len(GATEWAY_PORTS)):
            port = self._next_gateway_port
            self._next_gateway_port = port + 1 if port + 1 < GATEWAY_PORTS.stop else GATEWAY_PORTS.start
            if port not in used:
                return port
        return None

    async def _forward_tcp(
        self, guest_port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        gateway = self.gateway.gateway_ip
        linked = self._writer is not None
        port = self._gateway_port() if linked and len(self._tcp) < MAX_FLOWS else None
        if port is None:
            log.debug(
                "refused a forwarded connection to guest port %d: no link or too many flows", guest_port
            )
            writer.close()
            return
        ep = TcpEndpoint.connect(self.guest_ip, guest_port, gateway, port, secrets.randbits(32))
        flow = _TcpFlow(self, ep)
        key = (guest_port, gateway, port)
        self._tcp[key] = flow
        peer = writer.get_extra_info("peername")
        self._record(
            ("tcp", self.guest_ip, guest_port, None, f"forward from {peer[0]}:{peer[1]}", "allow")
        )
        flow.start(reader, writer)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CONNECT_TIMEOUT
        wait = 0.25
        while self._tcp.get(key) is flow and ep.state is State.SYN_SENT:
            if loop.time() >= deadline:
                log.debug("guest port %d did not answer a forwarded connection", guest_port)
                flow.abort()
                return
            self._send_ip(gateway, PROTO_TCP, ep.syn())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(flow.answered.wait(), wait)
            wait = min(wait * 2, 2.0)

    def _from_udp_forward(self, endpoint: UdpForward, address: HostAddress, data: bytes) -> None:
        peer = endpoint.peers.get(address)
        if peer is None:
            port = self._gateway_port() if len(self._udp_peers) < MAX_FLOWS else None
            if port is None:
                return  # UDP may drop; the cap keeps a flood of senders bounded
            peer = endpoint.peers[address] = self._udp_peers[port] = UdpPeer(endpoint, address, port)
            self._record(("udp", self.guest_ip, endpoint.forward.guest_port, None,
                          f"forward from {address[0]}:{address[1]}", "allow"))  # fmt: skip
        peer.last = time.monotonic()
        gateway = self.gateway.gateway_ip
        segment = Udp.build(
            gateway, self.guest_ip, peer.gateway_port, endpoint.forward.guest_port, data[:65000]
        )
        self._send_ip(gateway, PROTO_UDP, segment)

    def _to_udp_forward(self, udp: Udp) -> None:
        peer = self._udp_peers.get(udp.dst_port)
        if peer is None or udp.src_port != peer.forward.forward.guest_port:
            return
        peer.last = time.monotonic()
        peer.forward.send_back(bytes(udp.payload), peer.address)
