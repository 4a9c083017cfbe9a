"""The host side of port forwards: listening sockets on the host whose traffic the stack carries to a
guest port. Binding happens before QEMU starts, so a host port in use is a ``ConfigError`` at
``build()``, not a VM that silently lacks its forward."""

from __future__ import annotations

import asyncio
import errno
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import cast

from capsa.errors import ConfigError
from capsa.net.gateway import PortForward

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
