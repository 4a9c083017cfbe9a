"""Attacks on ``capsa serve``'s TLS surface (``--tls auto``): connections that stall in the
handshake, trickle a ClientHello, or send garbage instead of one must not hold the server's
connections past the request-head deadline, and a client served meanwhile must not notice."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytest.importorskip("cryptography")

from tests.server.conftest import Server, start_server

HEADER_TIMEOUT = 2.0
ATTACKERS = 200


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    directory = tmp_path_factory.mktemp("tls")
    srv = start_server(
        directory,
        *("--tls", "auto", "--tls-dir", str(directory / "ca")),
        *("--header-timeout", str(HEADER_TIMEOUT), "--max-sandboxes", "1"),
        ca=directory / "ca" / "ca.pem",
    )
    try:
        yield srv, directory / "ca" / "ca.pem"
    finally:
        srv.stop()


def _port(server: Server) -> int:
    return int(server.url.rsplit(":", 1)[1])


def _client_hello() -> bytes:
    """The first flight of a real TLS client (its ClientHello record)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="capsa.localhost")
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()


async def _held(port: int, opening: bytes, trickle: bytes) -> float:
    """Seconds until the server closes a connection that sent ``opening`` and then one byte of
    ``trickle`` every 0.25 s (at most 20 s)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    try:
        if opening:
            writer.write(opening)
        for i in range(80):
            if trickle:
                writer.write(trickle[i % len(trickle) : i % len(trickle) + 1])
                await writer.drain()
            try:
                if await asyncio.wait_for(reader.read(65536), 0.25) == b"":
                    break
            except TimeoutError:
                continue
    except OSError:
        pass
    finally:
        writer.close()
    return time.monotonic() - started


@pytest.mark.timeout(90)
def test_stalled_and_trickled_handshakes_are_cut_by_the_head_deadline(
    tls_server: tuple[Server, Path],
) -> None:
    """200 connections: silent after the TCP connect, or trickling a ClientHello a byte at a time.
    Each is closed once the request-head deadline passes (asyncio's own handshake timeout would be
    60 s), and an HTTPS client is served meanwhile."""
    server, ca = tls_server
    hello = _client_hello()

    async def attack() -> tuple[list[float], list[float]]:
        async def health() -> list[float]:
            times = []
            async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=ca)) as client:
                for _ in range(8):
                    await asyncio.sleep(0.3)
                    started = time.monotonic()
                    reply = await client.get(f"{server.url}/health", timeout=5)
                    assert reply.status_code == 200
                    times.append(time.monotonic() - started)
            return times

        silent = [_held(_port(server), b"", b"") for _ in range(ATTACKERS // 2)]
        trickled = [_held(_port(server), hello[:5], hello[5:]) for _ in range(ATTACKERS // 2)]
        tasks = [asyncio.ensure_future(c) for c in (*silent, *trickled)]
        health_times = await health()
        return list(await asyncio.gather(*tasks)), health_times

    held, health_times = asyncio.run(attack())
    assert max(held) < HEADER_TIMEOUT + 3, f"a stalled handshake was held {max(held):.1f}s"
    assert max(health_times) < 2.0


def test_slow_request_head_after_the_handshake_shares_the_deadline(
    tls_server: tuple[Server, Path],
) -> None:
    """A client that completes the handshake and then trickles its request head is closed by the
    same deadline, counted from the TCP connect."""
    server, ca = tls_server
    context = ssl.create_default_context(cafile=ca)
    started = time.monotonic()
    raw = socket.create_connection(("127.0.0.1", _port(server)), timeout=10)
    with context.wrap_socket(raw, server_hostname="localhost") as sock:
        sock.settimeout(0.25)
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n")
        reply = b""
        while time.monotonic() - started < 20:
            try:
                sock.sendall(b"X")
                chunk = sock.recv(4096)
            except TimeoutError:
                continue
            except (OSError, ssl.SSLError):
                break
            if not chunk:
                break
            reply += chunk
    held = time.monotonic() - started
    assert held < HEADER_TIMEOUT + 3, f"held {held:.1f}s"
    assert reply == b"" or reply.startswith(b"HTTP/1.1 408")


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n",  # plain HTTP on the TLS port
        b"\x16\x03\x01\x00\x05hello",  # a handshake record that is no ClientHello
        os.urandom(4096),
    ],
)
def test_garbage_instead_of_a_client_hello_is_closed_at_once(
    tls_server: tuple[Server, Path], garbage: bytes
) -> None:
    server, ca = tls_server
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", _port(server)), timeout=10) as sock:
        sock.sendall(garbage)
        reply = b""
        try:
            while chunk := sock.recv(65536):
                reply += chunk
        except ConnectionResetError:
            pass
    assert time.monotonic() - started < HEADER_TIMEOUT  # closed by the failed handshake itself
    assert b"HTTP/" not in reply and b"status" not in reply  # nothing is served in the clear
    ok = httpx.get(f"{server.url}/health", verify=ssl.create_default_context(cafile=ca), timeout=5)
    assert ok.status_code == 200
