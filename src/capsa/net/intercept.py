"""The secrets proxy: where the guest's flows to hosts bound to a secret go instead of straight out.

The NAT hands such a flow (a destination resolved for a bound host, on a bound port) to
:meth:`Interceptor.open`, which connects to the real upstream first (a flow is answered only once
the host side connected, as for every flow) and gives the NAT one end of a socket pair. On the other
end the proxy peeks at the guest's first bytes:

- a TLS ClientHello whose SNI is a bound host: the upstream connection is made TLS, verified
  (system trust store plus ``Gateway.upstream_ca``, host name checked) *before* the guest's
  handshake completes, then the guest's TLS is terminated with a certificate from the sandbox's CA
  and requests are relayed with placeholders swapped (:mod:`capsa.net.http1`). An upstream that
  fails verification closes the guest's connection mid-handshake: the guest sees a TLS failure and
  nothing was sent. ALPN offers the guest only ``http/1.1``.
- TLS for another name (or without SNI): relayed as it is, never decrypted.
- plain HTTP: relayed request by request; a secret is swapped in only if it allows HTTP and the Host
  header names a bound host this destination was resolved for.

Responses are relayed byte for byte as they come (server-sent events stream); requests are parsed
head by head, bodies streamed. Each use and each refusal goes to the network log, never a value.

Limits: at most ``limit`` connections at once (``Gateway.intercepted_connections``, 1024 by
default); past it a new one is refused (the guest gets an RST at once, not a hang) and logged. Each
holds three host file descriptors (the upstream socket and a socket pair to the NAT), so the first
interceptor raises the process's soft ``RLIMIT_NOFILE`` to the hard limit when it is lower than the
limit needs. Memory per connection is bounded by the stream limits (a request head is at most
:data:`~capsa.net.http1.MAX_HEAD`; reads are :data:`_READ` at a time, with backpressure both ways).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import resource
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path

from capsa._tasks import TaskSet
from capsa.net.gateway import INTERCEPTED
from capsa.net.http1 import MAX_HEAD, HttpError, Request, chunk_size, parse_request
from capsa.net.secrets import SecretSession

log = logging.getLogger(__name__)

# For the guest's first bytes and its TLS handshake: a guest opening a thousand connections at once
# takes tens of seconds to get through their handshakes under TCG, and a slow one holds only its own
# sandbox's connection slots.
HELLO_TIMEOUT = 60.0
UPSTREAM_TIMEOUT = 10.0  # for the upstream's TLS handshake
IDLE_TIMEOUT = 120.0  # between requests on a kept-alive connection, and between body reads
MAX_HELLO = 16384 + 5
FDS_PER_CONNECTION = 3  # the upstream socket and a socket pair to the NAT
FD_SPARE = 1024  # the process's other descriptors (QEMU's sockets, files, other flows)
_fd_warned = False
WARN_EVERY = 10.0  # seconds between warnings about refused connections (each is in the network log)
_READ = 1 << 16
_STREAM_LIMIT = MAX_HEAD + 1024

# record((proto, dst, port, domain, rule, action)): one line of the network log
Record = Callable[[tuple[str, ipaddress.IPv4Address, int | None, str | None, str, str]], None]
Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def parse_sni(hello: bytes) -> str | None:
    """The server name of a TLS ClientHello record (None if absent or malformed)."""
    try:
        if hello[0] != 0x16 or hello[5] != 0x01:
            return None
        end = min(len(hello), 5 + int.from_bytes(hello[3:5], "big"))
        at = 5 + 4 + 2 + 32
        at += 1 + hello[at]  # session id
        at += 2 + int.from_bytes(hello[at : at + 2], "big")  # cipher suites
        at += 1 + hello[at]  # compression methods
        stop = min(end, at + 2 + int.from_bytes(hello[at : at + 2], "big"))
        at += 2
        while at + 4 <= stop:
            kind, size = (
                int.from_bytes(hello[at : at + 2], "big"),
                int.from_bytes(hello[at + 2 : at + 4], "big"),
            )
            at += 4
            if kind == 0 and at + 5 <= stop and hello[at + 2] == 0:
                length = int.from_bytes(hello[at + 3 : at + 5], "big")
                name = hello[at + 5 : at + 5 + length]
                if len(name) != length or not name.isascii():
                    return None
                return name.decode().lower().removesuffix(".") or None
            at += size
    except IndexError:
        return None
    return None


def _hello_complete(data: bytes) -> bool:
    if data[:1] != b"\x16":
        return True  # not TLS: the first bytes say enough
    return len(data) >= MAX_HELLO or (
        len(data) >= 5 and len(data) >= 5 + int.from_bytes(data[3:5], "big")
    )


def make_fd_room(connections: int) -> int:
    """Raise this process's soft ``RLIMIT_NOFILE`` (as far as the hard limit) when it is below what
    ``connections`` intercepted connections need; returns the soft limit in force. Past it, a new
    connection fails with ``EMFILE`` and is refused like one past the limit."""
    global _fd_warned  # one warning per process, not one per sandbox
    need = FDS_PER_CONNECTION * connections + FD_SPARE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return soft
    target = hard if hard != resource.RLIM_INFINITY else max(need, 1 << 16)
    if target == soft and _fd_warned:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError) as exc:
        log.warning("secrets proxy: could not raise the open file limit from %d: %s", soft, exc)
        return soft
    if target < need:
        _fd_warned = True
        log.warning(
            "secrets proxy: the open file limit (ulimit -n, hard %d) leaves room for about %d "
            "intercepted connections at once, not %d; raise the hard limit to %d",
            hard, max(0, (target - FD_SPARE) // FDS_PER_CONNECTION), connections, need,
        )  # fmt: skip
    else:
        log.info("secrets proxy: raised the open file limit from %d to %d", soft, target)
    return target


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _peek(sock: socket.socket, timeout: float) -> bytes:
    """The guest's first bytes, left in the socket (empty: it closed or said nothing in time)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    pause = 0.002
    while loop.time() < deadline:
        try:
            data = sock.recv(MAX_HELLO, socket.MSG_PEEK)
        except BlockingIOError:
            data = None
        if data == b"":
            return b""
        if data is not None and _hello_complete(data):
            return data
        if data is None:
            ready: asyncio.Future[None] = loop.create_future()
            loop.add_reader(sock.fileno(), _settle, ready)
            try:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ready, max(0.0, deadline - loop.time()))
            finally:
                loop.remove_reader(sock.fileno())
        else:  # a partial hello (the socket stays readable): the rest is on its way, or stalled
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.2)
    return b""


class Interceptor:
    """One sandbox's secrets proxy (see the module docstring)."""

    def __init__(
        self, session: SecretSession, upstream_ca: tuple[Path, ...], record: Record, tasks: TaskSet,
        *, limit: int = INTERCEPTED,
    ) -> None:  # fmt: skip
        self.session = session
        self.limit = limit
        self._record = record
        self._tasks = tasks
        self._active = 0
        self._refused = 0  # since the last warning
        self._warned = -WARN_EVERY
        make_fd_room(limit)
        self._upstream_ca = upstream_ca
        self._upstream_context: ssl.SSLContext | None = None

    @property
    def _upstream(self) -> ssl.SSLContext:
        """Made at the first interception (loading the trust store costs tens of ms: not at build)."""
        context = self._upstream_context
        if context is None:
            context = ssl.create_default_context()
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.set_alpn_protocols(["http/1.1"])
            for path in self._upstream_ca:
                context.load_verify_locations(cafile=str(path))
            self._upstream_context = context
        return context

    def wants(self, names: frozenset[str], port: int) -> bool:
        return self.session.intercepts(names, port)

    async def open(
        self, host: str, port: int, dst: ipaddress.IPv4Address, names: frozenset[str]
    ) -> Streams:
        """Connect upstream, then return the NAT's end of the proxy (see the module docstring).
        Past :attr:`limit` connections at once, or out of file descriptors: refused (the guest gets
        an RST), recorded in the network log and warned about."""
        if self._active >= self.limit:
            self._refuse(dst, port, names, f"{self.limit} connections at once")
            raise ConnectionRefusedError("too many intercepted connections")
        self._active += 1  # held while connecting: concurrent opens cannot overshoot the limit
        try:
            upstream = await asyncio.open_connection(host, port, limit=_STREAM_LIMIT)
            ours, theirs = socket.socketpair()
        except OSError as exc:
            self._active -= 1
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                self._refuse(dst, port, names, "out of file descriptors (raise ulimit -n)")
            raise
        except BaseException:
            self._active -= 1
            raise
        try:
            ours.setblocking(False)
            guest = await asyncio.open_connection(sock=theirs, limit=_STREAM_LIMIT)
        except BaseException:
            self._active -= 1
            ours.close()
            theirs.close()
            upstream[1].close()
            raise
        self._tasks.spawn(self._serve(ours, upstream, dst, port, names), name="secrets-proxy")
        return guest

    def _refuse(self, dst: ipaddress.IPv4Address, port: int, names: frozenset[str], reason: str) -> None:
        domain = min(names) if names else None
        self._record(("tcp", dst, port, domain, f"secrets proxy refused: {reason}", "deny"))
        self._refused += 1
        now = time.monotonic()
        if now - self._warned >= WARN_EVERY:
            log.warning("secrets proxy: refused %d connection(s): %s", self._refused, reason)
            self._warned, self._refused = now, 0

    async def _serve(
        self, sock: socket.socket, upstream: Streams, dst: ipaddress.IPv4Address, port: int,
        names: frozenset[str],
    ) -> None:  # fmt: skip
        up_writer = upstream[1]
        guest_writer: asyncio.StreamWriter | None = None
        try:
            hello = await _peek(sock, HELLO_TIMEOUT)
            if not hello:
                return
            if hello[0] == 0x16:
                sni = parse_sni(hello)
                if sni is None or not self.session.bound(sni, port):
                    guest = await asyncio.open_connection(sock=sock, limit=_STREAM_LIMIT)
                    guest_writer = guest[1]
                    await _splice(guest, upstream)
                    return
                tls_up = await self._upstream_tls(upstream, sni, dst, port)
                if tls_up is None:
                    return
                guest = await self._guest_tls(sock, sni)
                guest_writer = guest[1]
                await self._proxy(guest, tls_up, dst, port, sni, tls=True, names=names)
            else:
                guest = await asyncio.open_connection(sock=sock, limit=_STREAM_LIMIT)
                guest_writer = guest[1]
                await self._proxy(guest, upstream, dst, port, None, tls=False, names=names)
        except (OSError, ssl.SSLError, TimeoutError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError) as exc:  # fmt: skip
            log.debug("secrets proxy connection to %s:%d ended: %r", dst, port, exc)
        finally:
            self._active -= 1
            if guest_writer is not None:
                guest_writer.close()
            else:
                sock.close()
            up_writer.close()

    async def _upstream_tls(
        self, upstream: Streams, sni: str, dst: ipaddress.IPv4Address, port: int
    ) -> Streams | None:
        reader, writer = upstream
        try:
            await asyncio.wait_for(
                writer.start_tls(self._upstream, server_hostname=sni), UPSTREAM_TIMEOUT
            )
        except (ssl.SSLError, ssl.CertificateError, OSError, TimeoutError) as exc:
            reason = getattr(exc, "verify_message", None) or type(exc).__name__
            rule = f"secrets withheld: upstream TLS failed ({reason})"
            self._record(("https", dst, port, sni, rule, "deny"))
            log.warning("secrets proxy: upstream %s:%d failed TLS verification: %s", sni, port, reason)
            return None
        return reader, writer

    async def _guest_tls(self, sock: socket.socket, sni: str) -> Streams:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=_STREAM_LIMIT)
        protocol = asyncio.StreamReaderProtocol(reader)
        transport, _ = await loop.connect_accepted_socket(
            lambda: protocol, sock, ssl=self.session.ca.server_context(sni),
            ssl_handshake_timeout=HELLO_TIMEOUT,
        )  # fmt: skip
        return reader, asyncio.StreamWriter(transport, protocol, reader, loop)

    async def _proxy(
        self, guest: Streams, upstream: Streams, dst: ipaddress.IPv4Address, port: int,
        sni: str | None, *, tls: bool, names: frozenset[str],
    ) -> None:  # fmt: skip
        g_reader, g_writer = guest
        u_reader, u_writer = upstream
        responses = self._tasks.spawn(_pump(u_reader, g_writer), name="secrets-responses")
        try:
            while not responses.done():
                try:
                    head = await asyncio.wait_for(g_reader.readuntil(b"\r\n\r\n"), IDLE_TIMEOUT)
                except asyncio.IncompleteReadError:
                    return
                except asyncio.LimitOverrunError:
                    raise HttpError(431, "request head too large") from None
                request = parse_request(head)
                self._swap(request, dst, port, sni, tls=tls, names=names)
                u_writer.write(request.head())
                await _body(request, g_reader, u_writer)
                if request.upgrade:
                    await _pump(g_reader, u_writer)
                    return
            await responses
        except HttpError as exc:
            responses.cancel()
            proto = "https" if tls else "http"
            self._record((proto, dst, port, sni, f"refused request: {exc.reason}", "deny"))
            g_writer.write(exc.response())
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(g_writer.drain(), 5)
        finally:
            responses.cancel()

    def _swap(
        self, request: Request, dst: ipaddress.IPv4Address, port: int, sni: str | None, *,
        tls: bool, names: frozenset[str],
    ) -> None:  # fmt: skip
        proto = "https" if tls else "http"
        host = request.host
        for secret in self.session.secrets:
            if secret.header is not None:  # a header of its own, set on requests to its hosts
                if host is None or not secret.bound_to(host, port):
                    continue
            elif not request.carries(self.session.placeholders[secret.name]):
                continue
            reason = None
            if host is None or not secret.bound_to(host, port):
                reason = f"{host or 'no Host header'} is not one of its hosts"
            elif tls and host != sni:
                reason = f"the Host header ({host}) is not the TLS server name ({sni})"
            elif not tls and not secret.allow_http:
                reason = "plain HTTP (the secret does not allow_http)"
            elif not tls and host not in names:
                reason = f"the destination was not resolved for {host}"
            if reason is None:
                if secret.header is None:
                    request.swap({self.session.placeholders[secret.name]: secret.value})
                else:
                    request.set_header(secret.header, secret.value)
                self._record((proto, dst, port, host, f"secret {secret.name} sent", "allow"))
            else:
                self._record(
                    (proto, dst, port, host, f"secret {secret.name} withheld: {reason}", "deny")
                )


async def _body(request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Relay the request's body as it comes (Content-Length bytes, or chunks up to the last)."""
    if request.chunked:
        while True:
            line = await asyncio.wait_for(reader.readuntil(b"\r\n"), IDLE_TIMEOUT)
            size = chunk_size(line)
            writer.write(line)
            if size == 0:
                while True:  # trailers, up to the blank line
                    trailer = await asyncio.wait_for(reader.readuntil(b"\r\n"), IDLE_TIMEOUT)
                    writer.write(trailer)
                    if trailer == b"\r\n":
                        break
                await writer.drain()
                return
            await _copy(reader, writer, size + 2)
    elif request.length:
        await _copy(reader, writer, request.length)
    await writer.drain()


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, count: int) -> None:
    while count:
        data = await asyncio.wait_for(reader.read(min(count, _READ)), IDLE_TIMEOUT)
        if not data:
            raise asyncio.IncompleteReadError(b"", count)
        writer.write(data)
        await writer.drain()
        count -= len(data)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Bytes as they come, until the reader ends (then the writer is closed)."""
    try:
        while data := await reader.read(_READ):
            writer.write(data)
            await writer.drain()
    except (OSError, ssl.SSLError):
        pass
    finally:
        writer.close()


async def _splice(a: Streams, b: Streams) -> None:
    await asyncio.gather(_pump(a[0], b[1]), _pump(b[0], a[1]))
