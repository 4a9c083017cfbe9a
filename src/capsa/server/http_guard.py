"""uvicorn's HTTP/1.1 protocol with a deadline for each request head (slowloris).

uvicorn closes idle keep-alive connections, but a client that sends one byte of a request line and
then trickles the rest (or never finishes its headers) holds its connection for ever, and a few
hundred such connections exhaust the server's descriptors. :class:`GuardedH11Protocol` arms a timer
when a connection opens and again when a response ends (the next request may begin): if the request
head is not complete when it fires, the connection gets a 408 and is closed. A response sent before
the body was read (a 413) also leaves the timer armed, so a client that keeps sending a refused body
is cut off too. h11 is used whether or not httptools is installed, so the limits do not depend on
what else is in the environment.

With TLS (``protocol_with(..., tls=context)``) the protocol does the handshake itself, with
:meth:`asyncio.loop.start_tls` on the plain connection, rather than leaving it to the listening
server: the same deadline then runs from the TCP connect through the handshake to the end of the
request head (a client that stalls mid-handshake, or sends garbage instead of a ClientHello, is
closed like a slow request), and a connection counts against ``--max-connections`` from its first
byte, not from the end of its handshake.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain\r\ncontent-length: 32\r\n"
    b"connection: close\r\n\r\nrequest headers were too slow\r\n\r\n"
)


class GuardedH11Protocol(H11Protocol):
    header_timeout: float = 10.0  # set by :func:`protocol_with` for a server's limits
    tls: ssl.SSLContext | None = None  # serve HTTPS (the handshake runs under the head deadline)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_started = False  # bytes of the awaited request head have arrived
        self._raw: asyncio.Transport | None = None  # the TCP connection while TLS is set up
        self._handshake: asyncio.Task[None] | None = None
        self._early: list[bytes] = []  # request bytes decrypted before start_tls returned
        self._lost = False

    def _arm(self) -> None:
        self._disarm()
        self._head_started = False
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport is None:  # still in the TLS handshake
            log.info("closing %s: TLS handshake not done within %gs", self._peer(), self.header_timeout)
            if self._raw is not None:
                self._raw.close()
            return
        if self.transport.is_closing():
            return
        if self._head_started and self.conn.our_state is h11.IDLE:  # (an idle one gets no 408)
            self.transport.write(_TIMEOUT_RESPONSE)
        log.info("closing %s: request head not complete within %gs", self.client, self.header_timeout)
        self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if self.tls is None:
            super().connection_made(transport)
            self._arm()
            return
        self._raw = transport
        self.connections.add(self)  # counted, and shut down with the server, from the start
        self._arm()
        self._handshake = self.loop.create_task(self._start_tls(transport, self.tls))

    async def _start_tls(self, raw: asyncio.Transport, context: ssl.SSLContext) -> None:
        try:
            secure = await self.loop.start_tls(
                raw, self, context, server_side=True, ssl_handshake_timeout=self.header_timeout
            )
        except (OSError, EOFError, RuntimeError) as exc:  # ssl.SSLError, a reset, the timeout
            log.debug("TLS handshake with %s failed: %r", self._peer(), exc)
            self._closed()
            return
        if self._lost or secure is None:
            self._closed()
            return
        self._raw = None
        super().connection_made(secure)
        early, self._early = self._early, []
        for data in early:
            self.data_received(data)

    def _peer(self) -> object:
        if self.client is not None:
            return self.client
        return None if self._raw is None else self._raw.get_extra_info("peername")

    def _closed(self) -> None:
        self._disarm()
        self.connections.discard(self)
        if self._raw is not None:
            self._raw.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._lost = True
        if self.transport is None:  # lost during the TLS handshake
            self.connections.discard(self)
            return
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.transport is None:  # the handshake's last flight carried request bytes too
            self._early.append(data)
            return
        self._head_started = True
        super().data_received(data)

    def shutdown(self) -> None:
        if self.transport is None:
            self._closed()
            return
        super().shutdown()

    def handle_events(self) -> None:
        super().handle_events()
        head_in = self.conn.their_state in (h11.SEND_BODY, h11.DONE)
        answering = self.conn.our_state is h11.SEND_RESPONSE  # h11: the request head is in
        if self._head_timer is not None and head_in and answering:
            self._disarm()  # the head is in; the body has its own idle timeout

    def on_response_complete(self) -> None:
        if not self.transport.is_closing():
            self._arm()  # before super(): it may run a pipelined request's events
        super().on_response_complete()


def protocol_with(header_timeout: float, tls: ssl.SSLContext | None = None) -> type[GuardedH11Protocol]:
    """The protocol class for one server (uvicorn instantiates it per connection); with ``tls``
    it serves HTTPS (give uvicorn no certificate then)."""
    attributes = {"header_timeout": header_timeout, "tls": tls}
    return type("CapsaH11Protocol", (GuardedH11Protocol,), attributes)
