"""Attacks on the secrets proxy (docs/secrets.md) by a hostile guest: driven at its guest end, the socket
the NAT relays a guest's flow to, against real local HTTPS upstreams (tests/secret_servers.py).
The guest must never obtain the value nor get it sent anywhere but a verified bound host."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import pickle
import ssl
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

import capsa
from capsa import ConfigError, Gateway, NetworkPolicy, VirtualNetwork
from capsa._tasks import TaskSet
from capsa.net.intercept import Interceptor
from capsa.net.secrets import SecretSession, check_secrets
from tests.secret_servers import API, BAD, FREE, OTHER, VALUE, Upstreams, upstreams

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@pytest.fixture(scope="module")
def servers() -> Iterator[Upstreams]:
    with upstreams() as result:
        yield result


class Proxy:
    def __init__(self, servers: Upstreams) -> None:
        self.servers = servers
        self.session = SecretSession(servers.gateway().secrets)
        self.log: list[tuple[object, ...]] = []
        self.tasks = TaskSet(logging.getLogger(__name__))
        self.interceptor = Interceptor(self.session, (servers.ca_file,), self.log.append, self.tasks)
        self.placeholder = self.session.placeholders["KEY"]

    async def raw(self, name: str = API) -> Streams:
        address = self.servers.addresses[name]
        dst = ipaddress.IPv4Address(address)
        return await self.interceptor.open(address, 443, dst, frozenset({name}))

    async def tls(self, name: str = API) -> Streams:
        reader, writer = await self.raw(name)
        context = ssl.create_default_context(cadata=self.session.ca.pem)
        await writer.start_tls(context, server_hostname=name)
        return reader, writer

    def seen(self, path: str) -> list[str]:
        return [s.headers.get("Authorization", "") for s in self.servers.seen if s.path == path]


@pytest_asyncio.fixture
async def proxy(servers: Upstreams) -> AsyncIterator[Proxy]:
    result = Proxy(servers)
    yield result
    result.tasks.cancel()


async def _request(streams: Streams, head: bytes) -> bytes:
    reader, writer = streams
    writer.write(head)
    await writer.drain()
    return await asyncio.wait_for(reader.read(65536), 30)


def _get(path: str, auth: str, host: str = API) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {auth}\r\n\r\n".encode()


@pytest.mark.asyncio
async def test_a_bound_request_gets_the_value_and_nothing_else_does(proxy: Proxy) -> None:
    reply = await _request(await proxy.tls(), _get("/s1", proxy.placeholder))
    assert reply.startswith(b"HTTP/1.1 200")
    assert proxy.seen("/s1") == [f"Bearer {VALUE}"]
    # the Host header naming another host than the TLS server name: withheld, logged
    reply = await _request(await proxy.tls(), _get("/s2", proxy.placeholder, host=OTHER))
    assert proxy.seen("/s2") == [f"Bearer {proxy.placeholder}"]
    assert any("withheld" in str(entry[4]) for entry in proxy.log)
    assert VALUE not in repr(proxy.log)


@pytest.mark.asyncio
async def test_garbage_tls_is_refused_and_the_proxy_goes_on(proxy: Proxy) -> None:
    # a ClientHello for the bound host, then garbage instead of the rest of the handshake
    outgoing = ssl.MemoryBIO()
    client = ssl.create_default_context().wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname=API)
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    hello = outgoing.read()
    assert hello.startswith(b"\x16")
    reader, writer = await proxy.raw()
    writer.write(hello + os.urandom(4096))
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 30) is not None  # closed, not hung
    # pure garbage that starts like a TLS record: relayed as it is, never decrypted, no value
    reader, writer = await proxy.raw()
    writer.write(b"\x16\x03\x01\x40\x00" + os.urandom(20000))
    await writer.drain()
    writer.close()
    # the proxy still serves
    reply = await _request(await proxy.tls(), _get("/s3", proxy.placeholder))
    assert reply.startswith(b"HTTP/1.1 200") and proxy.seen("/s3") == [f"Bearer {VALUE}"]


@pytest.mark.asyncio
async def test_a_huge_header_is_refused(proxy: Proxy) -> None:
    head = _get("/huge", proxy.placeholder).replace(
        b"\r\n\r\n", b"\r\nX-Pad: " + b"a" * 200_000 + b"\r\n\r\n"
    )
    reply = await _request(await proxy.tls(), head)
    assert reply.startswith(b"HTTP/1.1 431") and not proxy.seen("/huge")


@pytest.mark.asyncio
async def test_smuggling_framing_is_refused(proxy: Proxy) -> None:
    head = (
        f"POST /smuggle HTTP/1.1\r\nHost: {API}\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
        f"0\r\n\r\nGET /inner HTTP/1.1\r\nHost: {API}\r\nAuthorization: {proxy.placeholder}\r\n\r\n"
    ).encode()
    reply = await _request(await proxy.tls(), head)
    assert reply.startswith(b"HTTP/1.1 400") and not proxy.seen("/smuggle") and not proxy.seen("/inner")


@pytest.mark.asyncio
async def test_a_placeholder_split_across_packets_is_swapped_but_not_across_headers(
    proxy: Proxy,
) -> None:
    reader, writer = await proxy.tls()
    head = _get("/split", proxy.placeholder)
    middle = head.index(proxy.placeholder.encode()) + 10
    for piece in (head[:middle], head[middle:]):
        writer.write(piece)
        await writer.drain()
        await asyncio.sleep(0.05)
    assert (await asyncio.wait_for(reader.read(65536), 30)).startswith(b"HTTP/1.1 200")
    assert proxy.seen("/split") == [f"Bearer {VALUE}"]
    half = len(proxy.placeholder) // 2
    across = (
        f"GET /across HTTP/1.1\r\nHost: {API}\r\nX-A: {proxy.placeholder[:half]}\r\n"
        f"X-B: {proxy.placeholder[half:]}\r\n\r\n"
    ).encode()
    await _request((reader, writer), across)
    [seen] = [s for s in proxy.servers.seen if s.path == "/across"]
    assert VALUE not in str(seen.headers)


@pytest.mark.asyncio
async def test_plain_http_to_a_bound_host_does_not_get_the_value(
    proxy: Proxy, servers: Upstreams
) -> None:
    # port 443 spoken in clear: the proxy sees HTTP, the secret does not allow_http
    reader, writer = await proxy.raw()
    writer.write(_get("/plain", proxy.placeholder))
    await writer.drain()
    await asyncio.wait_for(reader.read(65536), 30)
    assert not any(VALUE in str(s.headers) for s in servers.seen if s.path == "/plain")
    assert any("withheld: plain HTTP" in str(entry[4]) for entry in proxy.log)
    assert not any("sent" in str(entry[4]) for entry in proxy.log)


def test_host_lists_wildcards_and_none() -> None:
    with pytest.raises(ConfigError):
        Gateway().secret("KEY", VALUE, hosts=[])
    with pytest.raises(ConfigError):
        Gateway().secret("KEY", VALUE, hosts="api.example.com")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        Gateway().secret("KEY", "bad\r\nvalue", hosts=["api.example.com"])
    with pytest.raises(ConfigError):
        Gateway().secret("KEY", VALUE, hosts=["*"])
    gateway = Gateway().secret("KEY", VALUE, hosts=["*.secret.test"])
    [secret] = gateway.secrets
    assert secret.bound_to(API, 443) and secret.bound_to(FREE, 443)
    assert not secret.bound_to("secret.test", 443) and not secret.bound_to("api.secret.test.evil", 443)
    assert not secret.bound_to(API, 8443)
    assert VALUE not in repr(gateway) and VALUE not in str(gateway)
    with pytest.raises(TypeError):
        pickle.dumps(gateway)


@pytest.mark.asyncio
async def test_a_secret_for_a_host_the_policy_denies_is_refused_at_build() -> None:
    policy = NetworkPolicy.deny_all().allow_domain("api.example.com")
    gateway = Gateway().policy(policy).secret("KEY", VALUE, hosts=["evil.example.net"])
    with pytest.raises(ConfigError, match="denies"):
        check_secrets(gateway.secrets, gateway.policy_value)
    with pytest.raises(ConfigError, match="denies"):  # before any VM starts
        await capsa.sandbox().network(VirtualNetwork.with_gateway(gateway)).build(timeout=5)
    wildcard = Gateway().policy(policy).secret("KEY", VALUE, hosts=["*.example.com"])
    with pytest.raises(ConfigError, match="denies"):
        check_secrets(wildcard.secrets, wildcard.policy_value)


@pytest.mark.asyncio
async def test_intercepted_connections_are_capped_refused_at_once_and_logged(proxy: Proxy) -> None:
    assert Gateway().intercept_limit >= 1024 and proxy.interceptor.limit == Gateway().intercept_limit
    for bad in (0, -1, True, 1 << 20, "9"):
        with pytest.raises(ConfigError):
            Gateway().intercepted_connections(bad)  # type: ignore[arg-type]
    limit = Gateway().intercepted_connections(8).intercept_limit
    interceptor = Interceptor(proxy.session, (), proxy.log.append, proxy.tasks, limit=limit)
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0, backlog=1024)
    port = server.sockets[0].getsockname()[1]
    dst = ipaddress.IPv4Address("127.0.0.1")
    opened = []

    async def one() -> Streams:
        return await interceptor.open("127.0.0.1", port, dst, frozenset({API}))

    try:
        # opened all at once: concurrent opens (each awaiting its upstream) cannot overshoot
        results = await asyncio.gather(*(one() for _ in range(limit + 3)), return_exceptions=True)
        opened = [r for r in results if not isinstance(r, BaseException)]
        refused = [r for r in results if isinstance(r, BaseException)]
        assert len(opened) == limit and all(isinstance(r, ConnectionRefusedError) for r in refused)
        assert sum("secrets proxy refused" in str(e[4]) for e in proxy.log) == 3
        opened.pop()[1].close()  # one guest leaves: its slot is free again once the proxy notices
        for _ in range(100):
            await asyncio.sleep(0.02)
            try:
                opened.append(await one())
                break
            except ConnectionRefusedError:
                continue
        assert len(opened) == limit
    finally:
        for _, writer in opened:
            writer.close()
        for writer in held:
            writer.close()
        server.close()


@pytest.mark.asyncio
async def test_an_upstream_with_a_bad_certificate_gets_nothing(proxy: Proxy) -> None:
    # BAD is bound to KEY, but its certificate is signed by no CA the gateway trusts: the guest's
    # handshake is cut before it completes, no request reaches the upstream, the failure is logged
    with pytest.raises((ssl.SSLError, ConnectionError)):
        streams = await proxy.tls(BAD)
        await _request(streams, _get("/bad-cert", proxy.placeholder, host=BAD))
    assert not proxy.seen("/bad-cert")
    assert any(entry[3] == BAD and "upstream TLS failed" in str(entry[4]) for entry in proxy.log)
