"""``vm.agent.open_connection(port)``: a TCP connection to a port of the guest's loopback, carried by
the guest agent (the guest needs no network interface for it).

The guest side is :mod:`capsa.agent.guest.connections`. Here the call's ``stdout`` stream feeds an
:class:`asyncio.StreamReader` and a :class:`ConnectionWriter` sends ``stdin`` frames against the
stream's credit, so the pair behaves as :func:`asyncio.open_connection`'s does, with the same
back-pressure end to end: a reader that stops reading stops the acks, which stops the guest
reading its socket, which stops the server in the guest.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from typing import Any

from capsa._tasks import TaskSet
from capsa.agent import wire
from capsa.agent.channel import Call, Channel, InStream
from capsa.agent.errors import agent_error, check_timeout
from capsa.errors import CapsaError, CapsaTimeoutError, ConfigError, ConnectionRefused

log = logging.getLogger(__name__)

READER_LIMIT = 1 << 20  # what the StreamReader buffers before the pump stops taking chunks
CONNECT_TIMEOUT = 10.0


class _PumpTransport(asyncio.ReadTransport):
    """What the StreamReader pauses and resumes when its buffer fills and drains: the pump that
    moves chunks from the agent stream into it waits on :attr:`resumed`."""

    def __init__(self) -> None:
        super().__init__()
        self.resumed = asyncio.Event()
        self.resumed.set()
        self._closing = False

    def pause_reading(self) -> None:
        self.resumed.clear()

    def resume_reading(self) -> None:
        self.resumed.set()

    def is_reading(self) -> bool:
        return self.resumed.is_set()

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        self._closing = True
        self.resumed.set()


class ConnectionWriter:
    """The sending half, shaped like :class:`asyncio.StreamWriter`: ``write`` buffers, ``drain``
    sends against the guest's credit, ``write_eof`` half-closes, ``close`` ends the connection."""

    def __init__(self, agent_conn: AgentConnection) -> None:
        self._conn = agent_conn
        self._buffer: list[bytes] = []
        self._lock = asyncio.Lock()
        self._eof = False

    @property
    def transport(self) -> Any:
        return None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._eof or self._conn.closing:
            raise ConnectionResetError("write on a closed connection")
        if data:
            self._buffer.append(bytes(data))

    def writelines(self, data: Any) -> None:
        for chunk in data:
            self.write(chunk)

    def can_write_eof(self) -> bool:
        return True

    async def drain(self) -> None:
        async with self._lock:
            while self._buffer:
                chunk = self._buffer.pop(0)
                for start in range(0, len(chunk), wire.CHUNK):
                    await self._conn.send(chunk[start : start + wire.CHUNK])

    def write_eof(self) -> None:
        """Half-close: the guest server reads end-of-file once what was written has arrived."""
        if not self._eof:
            self._eof = True
            self._conn.spawn(self._send_eof())

    async def _send_eof(self) -> None:
        with contextlib.suppress(ConnectionError, CapsaError):  # a reset: the reader reports it
            await self.drain()
            await self._conn.send_eof()

    def is_closing(self) -> bool:
        return self._conn.closing

    def close(self) -> None:
        self._conn.close_soon(self.drain())

    async def wait_closed(self) -> None:
        await self._conn.wait_closed()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return ("127.0.0.1", self._conn.port)
        if name == "sockname":
            return ("capsa-agent", 0)
        return default


class AgentConnection:
    """One relayed connection: the call, the pump into the reader, and its closing."""

    def __init__(self, channel: Channel, call: Call, port: int) -> None:
        self.channel = channel
        self.call = call
        self.port = port
        self.closing = False
        self.reader = asyncio.StreamReader(limit=READER_LIMIT)
        self._transport = _PumpTransport()
        self.reader.set_transport(self._transport)
        self._tasks = TaskSet(log)
        self._closed = asyncio.Event()
        self._pump = self._tasks.spawn(self._run_pump(call.streams["stdout"]), name="agent-conn")

    def spawn(self, coro: Any) -> None:
        self._tasks.spawn(coro, name="agent-conn-send")

    async def _run_pump(self, stream: InStream) -> None:
        try:
            while True:
                await self._transport.resumed.wait()
                chunk = await stream.read()
                if chunk is None:
                    break
                self.reader.feed_data(chunk)
            end = self.call.end.result() if self.call.end.done() else None
            if end is not None and not end.get("ok", True):
                error = agent_error(end.get("err"), f"connection to guest port {self.port}")
                self.reader.set_exception(ConnectionResetError(error.message))
            else:
                self.reader.feed_eof()
        except CapsaError as exc:
            self.reader.set_exception(ConnectionResetError(exc.message))

    async def send(self, chunk: bytes) -> None:
        credit = self.call.credits["stdin"]
        if not await credit.take(wire.cost(len(chunk)), self.call.end.done):
            raise ConnectionResetError(f"the connection to guest port {self.port} was closed")
        await self.channel.send({"t": "data", "id": self.call.id, "s": "stdin", "d": chunk})

    async def send_eof(self) -> None:
        if not self.call.end.done():
            await self.channel.send({"t": "eof", "id": self.call.id, "s": "stdin"})

    def close_soon(self, flush: Any) -> None:
        if self.closing:
            flush.close()
            return
        self.closing = True
        self._tasks.spawn(self._close(flush), name="agent-conn-close")

    async def _close(self, flush: Any) -> None:
        try:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    await flush
        finally:
            self.abort()

    def abort(self) -> None:
        """Forget the connection now; the guest closes its socket (with a reset if still open)."""
        self.closing = True
        if not self.call.end.done() and self.channel.failure is None:
            with contextlib.suppress(Exception):
                self.channel.post({"t": "cancel", "id": self.call.id})
        self.call.close()
        self._pump.cancel()
        self._transport.close()
        if not self.reader.at_eof() and self.reader.exception() is None:
            self.reader.feed_eof()
        self._closed.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()


async def open_connection(
    channel: Channel, port: int, timeout: float = CONNECT_TIMEOUT, first: bytes = b""
) -> tuple[asyncio.StreamReader, ConnectionWriter]:
    """See :meth:`capsa.agent.client.Agent.open_connection`."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(f"port must be an integer from 1 to 65535, got {port!r:.40}")
    check_timeout(timeout)
    if not isinstance(first, bytes) or len(first) > wire.CHUNK:
        raise ConfigError(f"first must be bytes, at most {wire.CHUNK} of them")
    call = await channel.call("connect", {"port": port}, in_streams=("stdout",), out_streams=("stdin",))
    try:
        if first:  # sent behind the request: the guest writes it once connected (one round trip less)
            await call.credits["stdin"].take(wire.cost(len(first)), call.response.done)
            await channel.send({"t": "data", "id": call.id, "s": "stdin", "d": first})
        async with asyncio.timeout(timeout):
            reply = await call.response
    except TimeoutError:
        _cancel(channel, call)
        raise CapsaTimeoutError(f"connecting to guest port {port} took more than {timeout}s") from None
    except BaseException:
        _cancel(channel, call)
        raise
    if not reply.get("ok"):
        call.close()
        err = reply.get("err")
        error = agent_error(err, f"connect to guest port {port}")
        if isinstance(err, dict) and err.get("errno") == errno.ECONNREFUSED:
            raise ConnectionRefused(
                error.message,
                kind="refused",
                errno=errno.ECONNREFUSED,
                hint=f"start a server listening on port {port} in the sandbox",
            )
        raise error
    conn = AgentConnection(channel, call, port)
    return conn.reader, ConnectionWriter(conn)


def _cancel(channel: Channel, call: Call) -> None:
    if channel.failure is None:
        with contextlib.suppress(Exception):
            channel.post({"t": "cancel", "id": call.id})
    call.close()


__all__ = ["ConnectionRefused", "ConnectionWriter", "open_connection"]
