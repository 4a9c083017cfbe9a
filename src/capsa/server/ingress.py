"""Ingress: HTTP and WebSocket traffic to any TCP port of a sandbox (E2B's ``get_host(port)``).

A request is for a sandbox port when its ``Host`` is ``{port}-{sandbox_id}.{domain}`` (``--domain``,
default ``localhost:<port>``, so a browser on the same machine opens
``http://8000-<id>.localhost:3000/``) or when it carries ``E2b-Sandbox-Id`` with an
``E2b-Sandbox-Port`` other than envd's and the interpreter's. Each request gets its own TCP
connection to ``127.0.0.1:port`` in the guest, opened *through the guest agent*
(:meth:`capsa.agent.client.Agent.open_connection`): the sandbox needs no network interface for it
and gains no egress.

HTTP is relayed at the byte level with h11 on the upstream side: the request head with
``Connection: close``, the body streamed as it arrives (chunked when the client's was, capped by
``--max-upload-mb`` and the body idle timeout), then the response head and its body streamed back
chunk by chunk, with back-pressure both ways (a slow client stops the acks, which stops the guest
server). A client that goes away ends the upstream connection at once (the agent resets it).
WebSockets are in :mod:`capsa.server.ingress_ws`.

Access: a sandbox's ports are public unless it was created with ``network.allow_public_traffic``
false; then a request must carry ``e2b-traffic-access-token`` (the ``trafficAccessToken`` create
returned). A paused sandbox with auto-resume is woken by the request. ``network.mask_request_host``
replaces the ``Host`` the guest server sees (``${PORT}`` becomes the port).

``49983-{id}.{domain}`` and ``49999-{id}.{domain}`` are not ingress: they are envd and the code
interpreter of that sandbox, the URLs the SDKs build when ``E2B_SANDBOX_URL`` is not set
(:func:`with_host_routing`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
from typing import Any

import h11
from starlette.types import Message, Receive, Scope, Send

from capsa.agent.connections import ConnectionRefused, ConnectionWriter
from capsa.errors import CapsaError, CapsaTimeoutError
from capsa.server.entry import ApiError
from capsa.server.exposure import is_public, mask_host
from capsa.server.limits import LimitedBody, Limits, RequestRejected, single_header
from capsa.server.registry import Registry

log = logging.getLogger(__name__)

ENVD_PORT = 49983
INTERPRETER_PORT = 49999
CONNECT_TIMEOUT = 10.0  # the guest agent's connect to the port (loopback: refused at once)
READ_SIZE = 256 << 10
MAX_RESPONSE_HEAD = 64 << 10
_HOST = re.compile(r"^([0-9]{1,5})-([A-Za-z0-9]{1,64})\.(.+)$")
# Hop-by-hop headers (RFC 9110 7.6.1) and the server's own: never passed to the guest server.
_REQUEST_DROP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"upgrade",
        b"transfer-encoding",
        b"x-access-token",
        b"e2b-traffic-access-token",
    }
)
_RESPONSE_DROP = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"trailer"})


class IngressError(Exception):
    """Why a request cannot reach the sandbox port: answered with ``status`` and ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def parse_host(host: str | None, domain: str) -> tuple[str, int] | None:
    """``(sandbox_id, port)`` of a ``{port}-{sandbox_id}.{domain}`` host, else None."""
    if not host:
        return None
    match = _HOST.match(host.lower())
    if match is None or match.group(3) != domain.lower():
        return None
    port = int(match.group(1))
    return (match.group(2), port) if 1 <= port <= 65535 else None


def with_host_routing(scope: Scope, domain: str) -> Scope:
    """``scope`` with the routing headers of a request to ``49983-{id}.{domain}`` (envd) or
    ``49999-{id}.{domain}`` (the interpreter), which the SDKs build when ``E2B_SANDBOX_URL`` is
    not set: ``E2b-Sandbox-Id``/``-Port`` from the host. When the request carries them too they
    must name the same sandbox and port (400 otherwise: a proxy routing on one and this server on
    the other must not disagree)."""
    found = parse_host(_header(scope, b"host"), domain)
    if found is None or found[1] not in (ENVD_PORT, INTERPRETER_PORT):
        return scope
    headers = list(scope["headers"])
    for name, value in ((b"e2b-sandbox-id", found[0]), (b"e2b-sandbox-port", str(found[1]))):
        given = single_header(headers, name)
        if given is None:
            headers.append((name, value.encode()))
        elif given.lower() != value:
            raise RequestRejected(400, f"the Host names {value} but {name.decode()} is {given}")
    return {**scope, "headers": headers}


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return str(value.decode("latin-1"))
    return None


class Ingress:
    """Finds the sandbox port a request is for and relays it (one instance per server)."""

    def __init__(self, registry: Registry, limits: Limits, domain: str) -> None:
        self.registry = registry
        self.limits = limits
        self.domain = domain

    def route(self, scope: Scope, sandbox_id: str | None) -> tuple[str, int] | None:
        """The ``(sandbox_id, port)`` this request is for, or None when it is not ingress."""
        by_host = parse_host(_header(scope, b"host"), self.domain)
        if by_host is not None:  # (envd's and the interpreter's hosts: :func:`with_host_routing`)
            return None if by_host[1] in (ENVD_PORT, INTERPRETER_PORT) else by_host
        if sandbox_id is None:
            return None
        raw = _header(scope, b"e2b-sandbox-port")
        if raw is None or not raw.isdigit() or len(raw) > 5:
            return None
        port = int(raw)
        if port in (ENVD_PORT, INTERPRETER_PORT) or not 1 <= port <= 65535:
            return None
        return sandbox_id, port

    async def open(
        self, scope: Scope, sandbox_id: str, port: int, first: bytes = b""
    ) -> tuple[Any, ConnectionWriter]:
        """Check access, wake the sandbox, connect to the port; raises :class:`IngressError`."""
        try:
            entry = self.registry.find(sandbox_id)
        except ApiError:
            raise IngressError(502, f"sandbox {sandbox_id} not found or not running") from None
        if not is_public(entry):
            token = _header(scope, b"e2b-traffic-access-token")
            if token is None or not secrets.compare_digest(
                token.encode("latin-1"), entry.traffic_token.encode()
            ):
                raise IngressError(403, "this sandbox's ports need its e2b-traffic-access-token")
        if entry.node_id is not None:
            raise IngressError(501, "ingress to sandboxes placed by --ray is not supported yet")
        try:
            entry = await self.registry.awake(entry.id)
        except ApiError as exc:
            status = 429 if exc.status == 429 else 502
            raise IngressError(status, f"sandbox {sandbox_id}: {exc.message}") from None
        try:
            return await entry.vm.agent.open_connection(port, timeout=CONNECT_TIMEOUT, first=first)
        except ConnectionRefused:
            message = f"nothing listens on port {port} in sandbox {sandbox_id}"
            raise IngressError(502, message) from None
        except CapsaTimeoutError:
            raise IngressError(504, f"port {port} in sandbox {sandbox_id} did not answer") from None
        except CapsaError as exc:
            raise IngressError(502, f"port {port} in sandbox {sandbox_id}: {exc.message}") from None

    def upstream_host(self, sandbox_id: str, port: int) -> bytes | None:
        """The ``Host`` the guest server gets instead of the client's (``mask_request_host``)."""
        try:
            mask = mask_host(self.registry.find(sandbox_id))
        except ApiError:
            return None
        return None if mask is None else mask.replace("${PORT}", str(port)).encode()

    async def http(self, scope: Scope, receive: Receive, send: Send, sandbox_id: str, port: int) -> None:
        body = LimitedBody(receive, self.limits.max_upload_bytes, self.limits.body_timeout)
        relay = _Relay(scope, body, send, port, self.upstream_host(sandbox_id, port))
        try:  # the request head travels with the connect
            relay.reader, relay.writer = await self.open(scope, sandbox_id, port, relay.start())
        except IngressError as exc:
            await _error(send, exc.status, exc.message)
            return
        try:
            await relay.run()
        finally:
            relay.writer.close()  # the agent resets the guest side if it is still open


async def _error(send: Send, status: int, message: str) -> None:
    body = f'{{"code": {status}, "message": "{_json_text(message)}"}}'.encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _json_text(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _canonical(name: bytes) -> bytes:
    return b"-".join(part[:1].upper() + part[1:] for part in name.split(b"-"))


class _Relay:
    """One HTTP exchange with the guest server over an agent connection."""

    def __init__(
        self,
        scope: Scope,
        receive: LimitedBody,
        send: Send,
        port: int,
        host: bytes | None = None,
    ) -> None:
        self.host = host  # replaces the client's Host (mask_request_host)
        self.scope = scope
        self.receive = receive
        self.send = send
        self.reader: Any = None
        self.writer: Any = None
        self.port = port
        self.conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD)
        self.started = False
        self.client_gone = False

    async def run(self) -> None:
        try:
            await self.upload()
        except (ConnectionError, CapsaError, h11.LocalProtocolError) as exc:
            log.debug("ingress: the guest server stopped reading the request: %r", exc)
        task = asyncio.current_task()
        assert task is not None
        watcher = asyncio.get_running_loop().create_task(self.watch(task))
        try:
            await self.download()
        except asyncio.CancelledError:
            if not self.client_gone:
                raise
            task.uncancel()
            log.debug("ingress: the client left during the response from port %d", self.port)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def watch(self, task: asyncio.Task[Any]) -> None:
        """The body is in: the next ASGI message is the client's disconnect; stop the relay then."""
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                self.client_gone = True
                task.cancel()
                return

    def head(self) -> h11.Request:
        scope = self.scope
        headers: list[tuple[bytes, bytes]] = []
        chunked = False
        for key, value in scope["headers"]:
            name = key.lower()
            if name == b"transfer-encoding":
                chunked = True
            if name not in _REQUEST_DROP and not (name == b"host" and self.host is not None):
                headers.append((name, value))
        if chunked:
            headers = [h for h in headers if h[0] != b"content-length"]
            headers.append((b"transfer-encoding", b"chunked"))
        if self.host is not None:
            headers.insert(0, (b"host", self.host))
        elif not any(name == b"host" for name, _ in headers):
            headers.append((b"host", f"127.0.0.1:{self.port}".encode()))
        client = scope.get("client")
        if client:
            headers.append((b"x-forwarded-for", str(client[0]).encode()))
        headers.append((b"connection", b"close"))
        target = scope.get("raw_path") or scope["path"].encode()
        if scope.get("query_string"):
            target += b"?" + scope["query_string"]
        # canonical names (Host, Content-Type), as E2B's proxy sends them: the ASGI server hands
        # them over lowercased, and a guest server that looks them up by exact case would miss them
        canonical = [(_canonical(name), value) for name, value in headers]
        return h11.Request(method=scope["method"], target=target, headers=canonical)

    def start(self) -> bytes:
        """The request head, to send with the connect."""
        return self.conn.send(self.head()) or b""

    async def upload(self) -> None:
        while True:
            message: Message = await self.receive()  # RequestRejected (413/408) propagates
            chunk = message.get("body", b"")
            if chunk:
                self.writer.write(self.conn.send(h11.Data(data=chunk)) or b"")
                await self.writer.drain()
            if not message.get("more_body", False):
                break
        self.writer.write(self.conn.send(h11.EndOfMessage()) or b"")
        await self.writer.drain()

    async def download(self) -> None:
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                await self.broken(f"the server on port {self.port} sent a malformed response: {exc}")
                return
            if event is h11.NEED_DATA:
                try:
                    data = await self.reader.read(READ_SIZE)
                except ConnectionError:
                    data = b""
                self.conn.receive_data(data)
                continue
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                headers = [(k, v) for k, v in event.headers if k not in _RESPONSE_DROP]
                start = {"type": "http.response.start", "status": event.status_code}
                await self.send({**start, "headers": headers})
                self.started = True
            elif isinstance(event, h11.Data):
                await self.send(
                    {"type": "http.response.body", "body": bytes(event.data), "more_body": True}
                )
            elif isinstance(event, h11.EndOfMessage):
                await self.send({"type": "http.response.body", "body": b""})
                return
            else:  # ConnectionClosed before a response
                await self.broken(
                    f"the server on port {self.port} closed the connection without a response"
                )
                return

    async def broken(self, message: str) -> None:
        if self.started:  # mid-body: all that is left is to end the client's connection
            raise RequestRejected(502, message)
        await _error(self.send, 502, message)


__all__ = ["Ingress", "IngressError", "parse_host", "with_host_routing"]
