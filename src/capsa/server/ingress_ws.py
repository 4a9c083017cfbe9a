"""WebSocket ingress: a client's WebSocket to ``{port}-{sandbox_id}.{domain}`` relayed to a
WebSocket server in the sandbox, over a connection through the guest agent (see
:mod:`capsa.server.ingress`).

The server performs the client handshake upstream with wsproto (the same library uvicorn serves the
downstream side with), accepts the client only once the guest server has accepted (with the
subprotocol it chose), then relays messages both ways; a close on either side closes the other
with the same code. A message from the guest is reassembled up to :data:`MAX_MESSAGE` bytes (the
downstream side's cap is uvicorn's ``ws_max_size``); past it the connection is closed with 1009.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from starlette.types import Receive, Scope, Send
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from capsa.agent.connections import ConnectionWriter
from capsa.errors import CapsaError
from capsa.server.ingress import Ingress, IngressError

log = logging.getLogger(__name__)

MAX_MESSAGE = 16 << 20
HANDSHAKE_TIMEOUT = 30.0
READ_SIZE = 256 << 10
_FORWARDED = frozenset({b"origin", b"cookie", b"authorization", b"user-agent"})


async def relay_websocket(
    ingress: Ingress, scope: Scope, receive: Receive, send: Send, target: tuple[str, int]
) -> None:
    """Relay one client WebSocket to ``target`` (``(sandbox_id, port)``)."""
    sandbox_id, port = target
    first = await receive()
    if first["type"] != "websocket.connect":
        return
    try:
        reader, writer = await ingress.open(scope, sandbox_id, port)
    except IngressError as exc:
        log.info("websocket ingress refused: %s", exc.message)
        await send({"type": "websocket.close", "code": 1008 if exc.status == 403 else 1011})
        return
    try:
        host = ingress.upstream_host(sandbox_id, port)
        await _Pipe(scope, receive, send, reader, writer, host=host).run()
    finally:
        writer.close()


class _Pipe:
    def __init__(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        reader: Any,
        writer: ConnectionWriter,
        *,
        host: bytes | None = None,
    ) -> None:
        self.host = host  # replaces the client's Host (mask_request_host)
        self.scope = scope
        self.receive = receive
        self.send = send
        self.reader = reader
        self.writer = writer
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.parts: list[str | bytes] = []
        self.size = 0

    async def run(self) -> None:
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                accepted = await self.handshake()
        except (TimeoutError, ConnectionError, CapsaError, RemoteProtocolError) as exc:
            log.info("websocket ingress: the guest server's handshake failed: %r", exc)
            accepted = None
        if accepted is None:
            await self.send({"type": "websocket.close", "code": 1011})
            return
        await self.send({"type": "websocket.accept", "subprotocol": accepted.subprotocol})
        up = asyncio.ensure_future(self.upstream())
        down = asyncio.ensure_future(self.downstream())
        try:
            await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (up, down):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def handshake(self) -> AcceptConnection | None:
        headers = [(k, v) for k, v in self.scope["headers"] if k.lower() in _FORWARDED]
        given = next((v for k, v in self.scope["headers"] if k.lower() == b"host"), b"localhost")
        host = self.host or given
        target = self.scope.get("raw_path") or self.scope["path"].encode()
        if self.scope.get("query_string"):
            target += b"?" + self.scope["query_string"]
        request = Request(
            host=host.decode("latin-1"),
            target=target.decode("latin-1"),
            subprotocols=list(self.scope.get("subprotocols", [])),
            extra_headers=headers,
        )
        await self.write(self.ws.send(request))
        while True:
            data = await self.reader.read(READ_SIZE)
            self.ws.receive_data(data or None)
            for event in self.ws.events():
                if isinstance(event, AcceptConnection):
                    return event
                if isinstance(event, RejectConnection):
                    return None
            if not data:
                return None

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def upstream(self) -> None:
        """Client → guest server."""
        while True:
            message = await self.receive()
            if message["type"] == "websocket.disconnect":
                with contextlib.suppress(LocalProtocolError, ConnectionError, CapsaError):
                    await self.write(self.ws.send(CloseConnection(code=message.get("code", 1000))))
                return
            if message.get("text") is not None:
                await self.write(self.ws.send(TextMessage(data=message["text"])))
            elif message.get("bytes") is not None:
                await self.write(self.ws.send(BytesMessage(data=message["bytes"])))

    async def downstream(self) -> None:
        """Guest server → client."""
        while True:
            try:
                data = await self.reader.read(READ_SIZE)
            except ConnectionError:
                data = b""
            self.ws.receive_data(data or None)
            for event in self.ws.events():
                if isinstance(event, Message):
                    if not await self.deliver(event):
                        return
                elif isinstance(event, Ping):
                    await self.write(self.ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    with contextlib.suppress(LocalProtocolError, ConnectionError, CapsaError):
                        await self.write(self.ws.send(event.response()))
                    await self.send({"type": "websocket.close", "code": event.code})
                    return
            if not data:
                await self.send({"type": "websocket.close", "code": 1011})
                return

    async def deliver(self, event: Message[Any]) -> bool:
        self.parts.append(event.data)
        self.size += len(event.data)
        if self.size > MAX_MESSAGE:
            await self.send({"type": "websocket.close", "code": 1009})
            return False
        if not event.message_finished:
            return True
        if isinstance(event, TextMessage):
            await self.send({"type": "websocket.send", "text": "".join(str(p) for p in self.parts)})
        else:
            joined = b"".join(p for p in self.parts if isinstance(p, bytes))
            await self.send({"type": "websocket.send", "bytes": joined})
        self.parts.clear()
        self.size = 0
        return True


__all__ = ["relay_websocket"]
