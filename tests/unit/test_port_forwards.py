"""Port forward configuration and binding, without a VM: bad input is a ConfigError before QEMU
would start, and a stack that failed to bind leaves nothing listening."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from capsa.errors import ConfigError
from capsa.net.gateway import Gateway
from capsa.net.stack import NetworkStack


@pytest.mark.parametrize(
    "make",
    [
        lambda: Gateway().forward_tcp(8080, 80).forward_tcp(8080, 81),  # same host port twice
        lambda: Gateway().forward_udp(5353, 53).forward_udp(5353, 54),
        lambda: Gateway().forward_tcp(8080, 80, host_address="0.0.0.0").forward_tcp(8080, 81),
        lambda: Gateway().forward_tcp(70000, 80),
        lambda: Gateway().forward_tcp(8080, 0),
        lambda: Gateway().forward_tcp(-1, 80),
        lambda: Gateway().forward_tcp(True, 80),  # type: ignore[arg-type]
        lambda: Gateway().forward_tcp("8080", 80),  # type: ignore[arg-type]
        lambda: Gateway().forward_tcp(8080, 80, host_address="localhost"),
    ],
)
def test_bad_forwards_are_config_errors(make: object) -> None:
    with pytest.raises(ConfigError):
        make()  # type: ignore[operator]


def test_forwards_that_do_not_overlap() -> None:
    gw = (Gateway().forward_tcp(8080, 80).forward_udp(8080, 53)  # other protocol
          .forward_tcp(8080, 80, host_address="127.0.0.2")  # other address
          .forward_tcp(0, 22).forward_tcp(0, 23))  # fmt: skip
    assert [(f.proto, f.host_address, f.host_port, f.guest_port) for f in gw.forwards] == [
        ("tcp", "127.0.0.1", 8080, 80),
        ("udp", "127.0.0.1", 8080, 53),
        ("tcp", "127.0.0.2", 8080, 80),
        ("tcp", "127.0.0.1", 0, 22),
        ("tcp", "127.0.0.1", 0, 23),
    ]


@pytest.mark.asyncio
@pytest.mark.timeout(10)
async def test_host_port_in_use_and_nothing_left_listening(tmp_path: Path) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        gw = Gateway().forward_udp(0, 53).forward_tcp(0, 22).forward_tcp(port, 80)
        stack = NetworkStack(gw)
        with pytest.raises(ConfigError, match=f"127.0.0.1:{port}.*in use"):
            await stack.start(tmp_path / "net.sock")
        bound = stack.forwards()
        assert [f.proto for f in bound] == ["udp", "tcp"] and all(f.host_port for f in bound)
        for f in bound:  # released again: binding the same ports works
            kind = socket.SOCK_STREAM if f.proto == "tcp" else socket.SOCK_DGRAM
            with socket.socket(socket.AF_INET, kind) as probe:
                probe.bind(("127.0.0.1", f.host_port))
        assert not (tmp_path / "net.sock").exists()
    finally:
        busy.close()


@pytest.mark.asyncio
@pytest.mark.timeout(10)
async def test_forwarded_connection_without_a_guest_is_closed(tmp_path: Path) -> None:
    stack = NetworkStack(Gateway().forward_tcp(0, 80))
    await stack.start(tmp_path / "net.sock")
    try:
        (bound,) = stack.forwards()
        reader, writer = await asyncio.open_connection("127.0.0.1", bound.host_port)
        assert await asyncio.wait_for(reader.read(10), 5) == b""  # no guest: closed, not a hang
        writer.close()
    finally:
        await stack.close()
