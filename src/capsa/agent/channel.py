"""The host end of the agent connection: one reader task, request ids, streams and credit.

Every byte from the guest is hostile. The decoder refuses frames over :data:`wire.MAX_FRAME` before
buffering them; a stream that is sent more than its :data:`wire.WINDOW` of credit is a protocol
violation; messages of unknown types, duplicate responses and malformed fields are violations too.
Any violation fails the whole channel with :class:`ProtocolError` (every waiter wakes up with it),
so a misbehaving guest costs at most one frame plus one window per open stream of host memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from capsa._tasks import TaskSet
from capsa.agent import wire
from capsa.errors import CapsaError, CapsaTimeoutError, ProtocolError

log = logging.getLogger(__name__)

READ_SIZE = 1 << 20
ACK_BATCH = wire.WINDOW // 4
SYNC_MAGIC = b"\x00\x00\x00\x00capsa-resync:"  # the guest's marker (capsa.agent.guest.attach)
SYNC_SKIP_LIMIT = 64 << 20  # stale bytes a restored guest may send before its marker

Message = dict[str, Any]
LostHandler = Callable[[], Awaitable[CapsaError]]


class InStream:
    """Guest → host stream of one call: buffered up to the window, acknowledged as it is consumed."""

    def __init__(self, channel: Channel, call_id: int, name: str) -> None:
        self._channel = channel
        self._id = call_id
        self.name = name
        self._chunks: deque[bytes] = deque()
        self._owed = 0  # cost units received and not yet acknowledged
        self._unacked_consumed = 0
        self._changed = asyncio.Event()
        self.eof = False

    def _push(self, data: object) -> None:
        if self.eof:
            raise ProtocolError(f"guest sent data on stream {self.name!r} after its end")
        if not isinstance(data, bytes) or not data:
            raise ProtocolError("a data frame must carry non-empty bytes")
        self._owed += wire.cost(len(data))
        if self._owed > wire.WINDOW:
            raise ProtocolError(f"guest overran the {wire.WINDOW}-unit window of {self.name!r}")
        self._chunks.append(data)
        self._changed.set()

    def _flush_ack(self) -> None:
        if self._unacked_consumed and not self.eof:
            self._channel.post({"t": "ack", "id": self._id, "s": self.name, "n": self._unacked_consumed})
            self._unacked_consumed = 0

    def _end(self) -> None:
        self.eof = True
        self._changed.set()

    def _wake(self) -> None:
        self._changed.set()

    async def read(self) -> bytes | None:
        """The next chunk, or ``None`` at the end of the stream."""
        while not self._chunks:
            if self.eof:
                return None
            self._channel.check()
            self._changed.clear()
            await self._changed.wait()
        data = self._chunks.popleft()
        charge = wire.cost(len(data))
        self._owed -= charge
        self._unacked_consumed += charge
        if self._unacked_consumed >= ACK_BATCH or not self._chunks:
            if not self.eof:
                self._channel.post(
                    {"t": "ack", "id": self._id, "s": self.name, "n": self._unacked_consumed}
                )
            self._unacked_consumed = 0
        return data


class Credit:
    """Host → guest credit of one stream."""

    def __init__(self, channel: Channel) -> None:
        self._channel = channel
        self._available = wire.WINDOW
        self._changed = asyncio.Event()

    def _grant(self, n: object) -> None:
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise ProtocolError("an ack must carry a positive integer")
        self._available += n
        if self._available > wire.WINDOW:
            raise ProtocolError("guest acknowledged more than was sent")
        self._changed.set()

    def _wake(self) -> None:
        self._changed.set()

    async def take(self, n: int, abort: Callable[[], bool]) -> bool:
        """Wait for ``n`` units; ``False`` if ``abort()`` turned true meanwhile."""
        while self._available < n:
            self._channel.check()
            if abort():
                return False
            self._changed.clear()
            await self._changed.wait()
        self._available -= n
        return True


class Call:
    """One request: its response, its end message, and its streams."""

    def __init__(
        self, channel: Channel, call_id: int, in_streams: tuple[str, ...], out_streams: tuple[str, ...]
    ):
        self.channel = channel
        self.id = call_id
        loop = asyncio.get_running_loop()
        self.response: asyncio.Future[Message] = loop.create_future()
        self.end: asyncio.Future[Message] = loop.create_future()
        self.streams = {name: InStream(channel, call_id, name) for name in in_streams}
        self.credits = {name: Credit(channel) for name in out_streams}
        self.label = ""  # what the call is, for messages (exec: the program and its guest pid)
        for future in (self.response, self.end):
            future.add_done_callback(_consume_exception)

    def _on_message(self, m: Message) -> None:
        kind = m["t"]
        if kind == "res":
            if self.response.done():
                raise ProtocolError(f"second response for request {self.id}")
            if not isinstance(m.get("ok"), bool):
                raise ProtocolError("a response needs a boolean 'ok'")
            self.response.set_result(m)
            return
        if not self.response.done():
            raise ProtocolError(f"{kind!r} for request {self.id} before its response")
        if kind == "end":
            if self.end.done():
                raise ProtocolError(f"second end for request {self.id}")
            self.end.set_result(m)
            for ended in self.streams.values():  # nothing more comes (a read that failed midway
                ended._end()  # ends with "end" alone: its reader must not wait for an "eof")
            self._wake_all()
            self.close()  # finished: the guest sends nothing more for it (no leak if never waited)
            return
        name = m.get("s")
        if kind == "ack":
            credit = self.credits.get(name) if isinstance(name, str) else None
            if credit is None:
                raise ProtocolError(f"ack for unknown stream {name!r}")
            credit._grant(m.get("n"))
            return
        stream = self.streams.get(name) if isinstance(name, str) else None
        if stream is None:
            raise ProtocolError(f"{kind!r} on unknown stream {name!r} of request {self.id}")
        if kind == "data":
            stream._push(m.get("d"))
        else:
            stream._end()

    def _fail(self, exc: CapsaError) -> None:
        for future in (self.response, self.end):
            if not future.done():
                future.set_exception(exc)
        self._wake_all()

    def _wake_all(self) -> None:
        for stream in self.streams.values():
            stream._wake()
        for credit in self.credits.values():
            credit._wake()

    def close(self) -> None:
        """Forget this call: later guest traffic for it is dropped."""
        self.channel._calls.pop(self.id, None)


def _consume_exception(future: asyncio.Future[Message]) -> None:
    if not future.cancelled():
        future.exception()  # mark retrieved: a failed channel fails calls nobody awaits any more


class Channel:
    """Framed, multiplexed connection to one guest agent over a connected stream socket."""

    def __init__(self, sock: socket.socket, on_lost: LostHandler, *, sync: bytes | None = None) -> None:
        """With ``sync`` (a random token: the connection to a guest restored from a snapshot), every
        byte before the guest's marker carrying that token is the old host's conversation and is
        skipped; the guest sends the marker when asked to ``resync`` (:meth:`sync_token`)."""
        self._sock = sock
        self._sync = SYNC_MAGIC + sync if sync is not None else None
        self.sync_token = sync
        self._on_lost = on_lost
        self._calls: dict[int, Call] = {}
        self._last_id = 0  # ids are 1, 2, 3…: anything above this was never sent
        self._failure: CapsaError | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._tasks = TaskSet(log)
        self._hello: asyncio.Future[Message] | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._hello = loop.create_future()
        self._hello.add_done_callback(_consume_exception)
        reader, self._writer = await asyncio.open_connection(sock=self._sock, limit=READ_SIZE)
        self._reader_task = self._tasks.spawn(self._read_loop(reader), name="agent-reader")

    async def hello(self) -> Message:
        assert self._hello is not None
        return await asyncio.shield(self._hello)

    def flush_acks(self) -> None:
        """Acknowledge now everything consumed: the guest then keeps (for a copy of itself that a
        new host may attach to) exactly the output this host has not consumed."""
        for call in list(self._calls.values()):
            for stream in call.streams.values():
                stream._flush_ack()

    def unfinished_calls(self) -> list[Call]:
        """Calls whose end has not arrived (requests in flight, processes still running): what a
        snapshot must not capture."""
        return [call for call in self._calls.values() if not call.end.done()]

    @property
    def failure(self) -> CapsaError | None:
        return self._failure

    def check(self) -> None:
        if self._failure is not None:
            raise self._failure

    # -- sending --

    def post(self, message: Message) -> None:
        """Queue a frame without waiting (acks and other small control frames)."""
        self.check()
        assert self._writer is not None
        self._writer.write(wire.encode(message))

    async def send(self, message: Message) -> None:
        self.post(message)
        assert self._writer is not None
        try:
            await self._writer.drain()
        except (ConnectionError, OSError) as exc:
            await self._lost(exc)
            self.check()

    async def call(
        self,
        op: str,
        args: Message,
        *,
        in_streams: tuple[str, ...] = (),
        out_streams: tuple[str, ...] = (),
    ) -> Call:
        self.check()
        self._last_id += 1
        call = Call(self, self._last_id, in_streams, out_streams)
        self._calls[call.id] = call
        await self.send({"t": "req", "id": call.id, "op": op, **args})
        return call

    async def request(self, op: str, args: Message, timeout: float) -> Message:
        """One request without streams: its response (``ok`` true or false), within ``timeout``."""
        call = await self.call(op, args)
        try:
            async with asyncio.timeout(timeout):
                return await call.response
        except TimeoutError:
            raise CapsaTimeoutError(f"the guest agent did not answer {op!r} within {timeout}s") from None
        finally:
            call.close()

    # -- receiving --

    async def _skip_to_marker(self, reader: asyncio.StreamReader, marker: bytes) -> bytes | None:
        """Read until ``marker``: what follows it, or None if the connection closed first."""
        window = b""
        skipped = 0
        while True:
            data = await reader.read(READ_SIZE)
            if not data:
                return None
            window += data
            found = window.find(marker)
            if found >= 0:
                return window[found + len(marker) :]
            skipped += len(window) - (len(marker) - 1)
            window = window[-(len(marker) - 1) :]
            if skipped > SYNC_SKIP_LIMIT:
                raise ProtocolError(f"no resynchronisation marker in {SYNC_SKIP_LIMIT} bytes")

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        decoder = wire.FrameDecoder()
        try:
            pending = b""
            if self._sync is not None:
                rest = await self._skip_to_marker(reader, self._sync)
                if rest is None:
                    await self._lost(None)
                    return
                pending = rest
            while True:
                data = pending or await reader.read(READ_SIZE)
                pending = b""
                if not data:
                    await self._lost(None)
                    return
                for message in decoder.feed(data):
                    self._dispatch(message)
        except wire.WireError as exc:
            self.fail(ProtocolError(f"the guest agent broke the protocol: {exc}"))
        except ProtocolError as exc:
            self.fail(ProtocolError(f"the guest agent broke the protocol: {exc.message}"))
        except (ConnectionError, OSError) as exc:
            await self._lost(exc)

    def _dispatch(self, m: Message) -> None:
        kind = m["t"]
        if kind == "hello":
            assert self._hello is not None
            if self._hello.done():
                raise ProtocolError("second hello")
            self._hello.set_result(m)
            return
        if kind not in ("res", "data", "eof", "end", "ack"):
            raise ProtocolError(f"unexpected message type {kind!r}")
        call_id = m.get("id")
        if not isinstance(call_id, int) or isinstance(call_id, bool):
            raise ProtocolError(f"{kind!r} without an integer id")
        call = self._calls.get(call_id)
        if call is not None:
            call._on_message(m)
        elif not 0 < call_id <= self._last_id:
            raise ProtocolError(f"{kind!r} for request {call_id}, which was never sent")

    async def _lost(self, exc: BaseException | None) -> None:
        if self._failure is not None:
            return
        log.debug("agent connection lost: %s", exc)
        self.fail(await self._on_lost())

    def fail(self, exc: CapsaError) -> None:
        """Fail the channel: every pending and future operation raises ``exc``."""
        if self._failure is not None:
            return
        self._failure = exc
        if self._hello is not None and not self._hello.done():
            self._hello.set_exception(exc)
        for call in list(self._calls.values()):
            call._fail(exc)
        self._calls.clear()
        if self._writer is not None:
            self._writer.close()

    async def close(self, exc: CapsaError) -> None:
        self.fail(exc)
        task = self._reader_task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._writer is not None:
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()
        self._sock.close()
