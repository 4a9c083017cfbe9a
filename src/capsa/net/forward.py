"""Port forwards: listening sockets on the host whose traffic the stack carries to a guest port
(:class:`Forwarder` is the guest side). Binding happens before QEMU starts, so a host port in use
is a ``ConfigError`` at ``build()``, not a VM that silently lacks its forward."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import cast

from capsa.errors import ConfigError
from capsa.net.gateway import PortForward
from capsa.net.nat import CONNECT_TIMEOUT, MAX_FLOWS, UDP_IDLE, Nat, Record, Send
from capsa.net.packets import PROTO_UDP, Udp
from capsa.net.tcp import State, TcpEndpoint

log = logging.getLogger(__name__)

HostAddress = tuple[str, int]


@dataclass(frozen=True)
class ForwardedPort:
    """A forward as bound: ``host_port`` is the real port, also when 0 was asked for."""

    proto: str
    host_address: str
    host_port: int
    guest_port: int


def _bind_error(forward: PortForward, exc: OSError) -> ConfigError:
    where = f"{forward.host_address}:{forward.host_port}"
    if exc.errno == errno.EADDRINUSE:
        return ConfigError(
            f"cannot forward {forward.proto} {where} to guest port {forward.guest_port}: "
            "the host port is in use",
            hint="pick another host port, or 0 for any free one (see vm.network.forwards())",
        )
    return ConfigError(
        f"cannot forward {forward.proto} {where}: {exc.strerror or exc}",
        hint="the host address must belong to this machine; ports below 1024 need privileges",
    )


async def listen_tcp(
    forward: PortForward,
    on_connect: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> tuple[asyncio.AbstractServer, ForwardedPort]:
    try:
        server = await asyncio.start_server(
            on_connect, forward.host_address, forward.host_port, reuse_address=True
        )
    except OSError as exc:
        raise _bind_error(forward, exc) from None
    port = server.sockets[0].getsockname()[1]
    return server, ForwardedPort("tcp", forward.host_address, port, forward.guest_port)


@dataclass
class UdpPeer:
    """One host sender of a UDP forward, known to the guest by a gateway port of its own."""

    forward: UdpForward
    address: HostAddress
    gateway_port: int
    last: float = field(default_factory=time.monotonic)


class UdpForward(asyncio.DatagramProtocol):
    """A bound UDP forward. Datagrams go to ``deliver``; replies go back with :meth:`send_back`."""

    def __init__(
        self, forward: PortForward, deliver: Callable[[UdpForward, HostAddress, bytes], None]
    ) -> None:
        self.forward = forward
        self.deliver = deliver
        self.peers: dict[HostAddress, UdpPeer] = {}
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio's selector datagram transport does not subclass DatagramTransport on 3.11
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self.deliver(self, (str(addr[0]), int(addr[1])), data)

    def send_back(self, data: bytes, address: HostAddress) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(data, address)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def listen_udp(
    forward: PortForward, deliver: Callable[[UdpForward, HostAddress, bytes], None]
) -> tuple[UdpForward, ForwardedPort]:
    loop = asyncio.get_running_loop()
    endpoint = UdpForward(forward, deliver)
    try:
        transport, _ = await loop.create_datagram_endpoint(
            lambda: endpoint, local_addr=(forward.host_address, forward.host_port)
        )
    except OSError as exc:
        raise _bind_error(forward, exc) from None
    port = transport.get_extra_info("sockname")[1]
    return endpoint, ForwardedPort("udp", forward.host_address, port, forward.guest_port)


GATEWAY_PORTS = range(40000, 60000)  # the gateway's source ports for forwarded connections


class Forwarder:
    """The guest side of one guest's port forwards: a host connection or datagram reaches a guest port
    and appears to come from the gateway's address, on a gateway port of its own."""

    def __init__(self, nat: Nat, send: Send, record: Record, linked: Callable[[], bool]) -> None:
        self._nat = nat
        self._send = send
        self._record = record
        self._linked = linked
        self.bound: list[ForwardedPort] = []
        self._tcp_listeners: list[asyncio.AbstractServer] = []
        self._udp_listeners: list[UdpForward] = []
        self._udp_peers: dict[int, UdpPeer] = {}  # by gateway port
        self._next_gateway_port = GATEWAY_PORTS.start

    async def listen(self, forward: PortForward) -> ForwardedPort:
        """Bind ``forward`` on the host (``ConfigError`` if the port is taken)."""
        if forward.proto == "tcp":
            accept = functools.partial(self._forward_tcp, forward.guest_port)
            server, bound = await listen_tcp(forward, accept)
            self._tcp_listeners.append(server)
        else:
            endpoint, bound = await listen_udp(forward, self._from_udp_forward)
            self._udp_listeners.append(endpoint)
        self.bound.append(bound)
        return bound

    def close(self) -> None:
        for listener in self._tcp_listeners:
            listener.close()
        for endpoint in self._udp_listeners:
            endpoint.close()
        self._udp_peers.clear()

    def reap(self, now: float) -> None:
        for port, peer in list(self._udp_peers.items()):
            if now - peer.last > UDP_IDLE:
                del self._udp_peers[port]
                peer.forward.peers.pop(peer.address, None)

    def _gateway_port(self) -> int | None:
        """A gateway port no forwarded TCP connection or UDP peer uses (None: all taken)."""
        gateway = self._nat.gateway.gateway_ip
        used = {key.remote_port for key in self._nat.tcp if key.remote_ip == gateway}
        used |= self._udp_peers.keys()
        for _ in range(len(GATEWAY_PORTS)):
            port = self._next_gateway_port
            self._next_gateway_port = port + 1 if port + 1 < GATEWAY_PORTS.stop else GATEWAY_PORTS.start
            if port not in used:
                return port
        return None

    async def _forward_tcp(
        self, guest_port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        nat = self._nat
        gateway = nat.gateway.gateway_ip
        port = self._gateway_port() if self._linked() and len(nat.tcp) < MAX_FLOWS else None
        if port is None:
            log.debug("refused a forwarded connection to guest port %d: no link or too many flows",
                      guest_port)  # fmt: skip
            writer.close()
            return
        ep = TcpEndpoint.connect(nat.guest_ip, guest_port, gateway, port, secrets.randbits(32))
        flow = nat.new_tcp_flow(ep)
        peer = writer.get_extra_info("peername")
        self._record(
            ("tcp", nat.guest_ip, guest_port, None, f"forward from {peer[0]}:{peer[1]}", "allow")
        )
        flow.start(reader, writer)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CONNECT_TIMEOUT
        wait = 0.25
        while nat.tcp.get(flow.key) is flow and ep.state is State.SYN_SENT:
            if loop.time() >= deadline:
                log.debug("guest port %d did not answer a forwarded connection", guest_port)
                flow.abort()
                return
            flow.send(ep.syn())
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
            self._record(("udp", self._nat.guest_ip, endpoint.forward.guest_port, None,
                          f"forward from {address[0]}:{address[1]}", "allow"))  # fmt: skip
        peer.last = time.monotonic()
        gateway = self._nat.gateway.gateway_ip
        segment = Udp.build(
            gateway, self._nat.guest_ip, peer.gateway_port, endpoint.forward.guest_port, data[:65000]
        )
        self._send(gateway, PROTO_UDP, segment, True)

    def to_udp_forward(self, udp: Udp) -> None:
        """A datagram from the guest to the gateway: a reply to a UDP forward's peer, or nothing."""
        peer = self._udp_peers.get(udp.dst_port)
        if peer is None or udp.src_port != peer.forward.forward.guest_port:
            return
        peer.last = time.monotonic()
        peer.forward.send_back(bytes(udp.payload), peer.address)
