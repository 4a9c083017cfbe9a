"""Attacks through the process listing and re-attachment (``vm.agent.processes()``, ``attach``,
and the resynchronisation of a restored guest's connection): a hostile guest answers with garbage,
huge listings or stale bytes. The host must fail with :class:`ProtocolError` (or skip a bounded
amount), never trust the fields, hang or buffer without bound."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from capsa.agent import wire
from capsa.agent.attach import resync
from capsa.agent.channel import SYNC_MAGIC, SYNC_SKIP_LIMIT, Channel
from capsa.agent.client import Agent
from capsa.errors import CapsaError, ProtocolError, VMNotRunning

pytestmark = pytest.mark.asyncio

GOOD_ROW = {
    "pid": 42,
    "argv": ["sh", "-c", "sleep 9"],
    "pty": False,
    "started": 1.7e9,
    "attached": False,
    "running": True,
    "code": None,
    "signal": None,
}


class Guest:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.decoder = wire.FrameDecoder()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(sock=self.sock)

    def send(self, message: dict[str, Any]) -> None:
        assert self.writer is not None
        self.writer.write(wire.encode(message))

    def raw(self, data: bytes) -> None:
        assert self.writer is not None
        self.writer.write(data)

    async def request(self) -> dict[str, Any]:
        assert self.reader is not None
        while True:
            for message in self.decoder.feed(await self.reader.read(4096)):
                if message["t"] == "req":
                    return message

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def _lost() -> CapsaError:
    return VMNotRunning("fake VM went away")


@pytest_asyncio.fixture
async def pair() -> AsyncIterator[tuple[Agent, Guest]]:
    host_sock, guest_sock = socket.socketpair()
    channel = Channel(host_sock, _lost)
    await channel.start()
    guest = Guest(guest_sock)
    await guest.open()
    yield Agent(channel), guest
    guest.close()
    await channel.close(VMNotRunning("test over"))


async def _listing(pair: tuple[Agent, Guest], rows: object) -> Any:
    agent, guest = pair
    task = asyncio.ensure_future(agent.processes(timeout=5))
    req = await guest.request()
    assert req["op"] == "processes"
    guest.send({"t": "res", "id": req["id"], "ok": True, "processes": rows})
    return await task


async def test_a_well_formed_listing_is_parsed(pair: tuple[Agent, Guest]) -> None:
    [info] = await _listing(pair, [GOOD_ROW])
    assert info.pid == 42 and info.argv == ("sh", "-c", "sleep 9") and info.running


BAD_LISTINGS = {
    "not a list": {"pid": 1},
    "too many rows": [GOOD_ROW] * 1001,
    "a row that is not a map": ["x"],
    "a negative pid": [{**GOOD_ROW, "pid": -1}],
    "a boolean pid": [{**GOOD_ROW, "pid": True}],
    "a pid past PID_MAX_LIMIT": [{**GOOD_ROW, "pid": 1 << 40}],
    "argv not a list": [{**GOOD_ROW, "argv": "sh"}],
    "argv with a number": [{**GOOD_ROW, "argv": ["sh", 3]}],
    "argv too long": [{**GOOD_ROW, "argv": ["x"] * 65}],
    "a huge word": [{**GOOD_ROW, "argv": ["x" * 300]}],
    "a start time that is not a number": [{**GOOD_ROW, "started": "now"}],
    "a start time in the far future": [{**GOOD_ROW, "started": 1e300}],
    "a flag that is not a bool": [{**GOOD_ROW, "running": 1}],
    "an exit code for a running process": [{**GOOD_ROW, "code": 0}],
    "an exited process without a status": [{**GOOD_ROW, "running": False}],
    "an exit code out of range": [{**GOOD_ROW, "running": False, "code": 300}],
    "both a code and a signal": [{**GOOD_ROW, "running": False, "code": 1, "signal": 9}],
}


@pytest.mark.parametrize("rows", list(BAD_LISTINGS.values()), ids=list(BAD_LISTINGS))
async def test_a_hostile_listing_is_a_protocol_error(pair: tuple[Agent, Guest], rows: object) -> None:
    """Attack: the guest lists processes with ill-typed, out-of-range or too many fields, hoping the
    host trusts them (a pid used later, an argv echoed to clients, a listing held in memory)."""
    with pytest.raises(ProtocolError):
        await _listing(pair, rows)


@pytest.mark.parametrize(
    "reply",
    [
        {"ok": True, "pid": 7, "stdin": True, "argv": ["sh"]},  # another process than asked for
        {"ok": True, "pid": 42, "stdin": "yes", "argv": ["sh"]},
        {"ok": True, "pid": 42, "stdin": True, "argv": [1]},
    ],
)
async def test_a_hostile_attach_reply_is_a_protocol_error(
    pair: tuple[Agent, Guest], reply: dict[str, Any]
) -> None:
    """Attack: the guest answers ``attach`` for another pid or with ill-typed fields."""
    agent, guest = pair
    task = asyncio.ensure_future(agent.attach(42, timeout=5))
    req = await guest.request()
    assert req["op"] == "attach" and req["pid"] == 42
    guest.send({"t": "res", "id": req["id"], **reply})
    with pytest.raises(ProtocolError):
        await task


async def _restored(token: bytes) -> tuple[Channel, Guest]:
    host_sock, guest_sock = socket.socketpair()
    channel = Channel(host_sock, _lost, sync=token)
    await channel.start()
    guest = Guest(guest_sock)
    await guest.open()
    return channel, guest


async def test_stale_bytes_before_the_marker_are_skipped() -> None:
    """A restored guest's port carries the old host's half-sent frames (a truncated frame, frames
    for request ids the new host never sent): all skipped up to the marker with the host's token."""
    token = bytes(range(16))
    channel, guest = await _restored(token)
    try:
        task = asyncio.ensure_future(resync(channel, 5))
        req = await guest.request()
        assert req["op"] == "resync" and req["token"] == token
        guest.raw(wire.encode({"t": "data", "id": 99, "s": "stdout", "d": b"old"})[:-2])
        guest.raw(SYNC_MAGIC + bytes(16))  # a marker with another token is stale too
        guest.send({"t": "res", "id": 555, "ok": True})
        guest.raw(SYNC_MAGIC + token)
        guest.send({"t": "res", "id": req["id"], "ok": True})
        await asyncio.wait_for(task, 5)
        assert channel.failure is None
    finally:
        guest.close()
        await channel.close(VMNotRunning("test over"))


async def test_a_guest_that_never_sends_the_marker_costs_bounded_memory() -> None:
    """Attack: the restored guest streams bytes without ever sending the marker. The host skips at
    most SYNC_SKIP_LIMIT bytes, keeping only a marker's length of them, then fails the channel."""
    channel, guest = await _restored(bytes(16))
    try:
        task = asyncio.ensure_future(resync(channel, 60))
        await guest.request()
        chunk = b"\xaa" * (1 << 20)
        for _ in range(SYNC_SKIP_LIMIT // len(chunk) + 2):
            if channel.failure is not None:
                break
            guest.raw(chunk)
            assert guest.writer is not None
            try:
                await guest.writer.drain()
            except ConnectionError:  # the host gave up and hung up: what the test wants
                break
        with pytest.raises(ProtocolError, match="resynchronisation"):
            await asyncio.wait_for(task, 30)
    finally:
        guest.close()
        await channel.close(VMNotRunning("test over"))
