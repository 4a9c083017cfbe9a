"""The host agent client against fake agents on a socketpair: a well-behaved one (protocol flows)
and hostile ones (garbage, oversized frames, window overruns, silence, hang-ups)."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import pytest_asyncio

from capsa.agent import wire
from capsa.agent.channel import Channel
from capsa.agent.client import Agent
from capsa.agent.exec import Process
from capsa.errors import (
    CapsaError,
    CapsaTimeoutError,
    ConfigError,
    GuestFileNotFoundError,
    ProtocolError,
    VMNotRunning,
)

pytestmark = pytest.mark.asyncio


class FakeGuest:
    """The guest end of the socketpair, scripted by the test."""

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

    async def recv(self) -> dict[str, Any]:
        assert self.reader is not None
        while True:
            messages = self.decoder.feed(await self.reader.read(1))
            if messages:
                return messages[0]

    async def recv_request(self) -> dict[str, Any]:
        while True:
            message = await self.recv()
            if message["t"] == "req":
                return message

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


Pair = tuple[Agent, FakeGuest]


@pytest_asyncio.fixture
async def pair() -> AsyncIterator[Pair]:
    host_sock, guest_sock = socket.socketpair()

    async def lost() -> CapsaError:
        return VMNotRunning("fake VM went away")

    channel = Channel(host_sock, lost)
    await channel.start()
    guest = FakeGuest(guest_sock)
    await guest.open()
    guest.send({"t": "hello", "v": wire.PROTOCOL_VERSION, "pid": 1})
    assert (await asyncio.wait_for(channel.hello(), 5))["v"] == wire.PROTOCOL_VERSION
    yield Agent(channel), guest
    guest.close()
    await channel.close(VMNotRunning("test over"))


async def answer(guest: FakeGuest, **body: Any) -> dict[str, Any]:
    req = await guest.recv_request()
    guest.send({"t": "res", "id": req["id"], **body})
    return req


async def test_ping_round_trip(pair: Pair) -> None:
    agent, guest = pair
    task = asyncio.ensure_future(agent.ping(timeout=5))
    req = await answer(guest, ok=True)
    await task
    assert req["op"] == "ping"


async def test_exec_flow_and_exit_code(pair: Pair) -> None:
    agent, guest = pair
    task = asyncio.ensure_future(agent.exec("sh").args(["-c", "x"]).env("A", "1").cwd("/tmp").run())
    req = await answer(guest, ok=True, pid=42)
    assert (req["op"], req["argv"], req["env"], req["cwd"], req["stdin"]) == (
        "exec",
        ["sh", "-c", "x"],
        {"A": "1"},
        "/tmp",
        False,
    )
    sid = req["id"]
    guest.send({"t": "data", "id": sid, "s": "stdout", "d": b"out"})
    guest.send({"t": "data", "id": sid, "s": "stderr", "d": b"\xff"})
    guest.send({"t": "eof", "id": sid, "s": "stdout"})
    guest.send({"t": "eof", "id": sid, "s": "stderr"})
    guest.send({"t": "end", "id": sid, "code": None, "signal": 9})
    result = await asyncio.wait_for(task, 5)
    assert (result.exit_code, result.signal, result.stdout_bytes, result.stderr) == (
        137,
        9,
        b"out",
        "\ufffd",
    )


async def test_error_reply_maps_to_a_guest_file_error(pair: Pair) -> None:
    agent, guest = pair
    task = asyncio.ensure_future(agent.read_file("/etc/missing"))
    err = {"kind": "not_found", "msg": "No such file", "errno": 2, "path": "/etc/missing"}
    await answer(guest, ok=False, err=err)
    with pytest.raises(GuestFileNotFoundError) as info:
        await task
    assert (info.value.path, info.value.errno) == ("/etc/missing", 2)


async def test_silent_agent_times_out(pair: Pair) -> None:
    agent, _ = pair
    with pytest.raises(CapsaTimeoutError):
        await agent.ping(timeout=0.3)


Hostile = Callable[[FakeGuest, dict[str, Any]], Awaitable[None]]


async def _garbage(guest: FakeGuest, req: dict[str, Any]) -> None:
    guest.raw(struct.pack(">I", 5) + b"\xc1\xc1\xc1\xc1\xc1")


async def _oversized(guest: FakeGuest, req: dict[str, Any]) -> None:
    guest.raw(struct.pack(">I", 1 << 31))  # announces 2 GiB; nothing is buffered


async def _not_a_map(guest: FakeGuest, req: dict[str, Any]) -> None:
    body = b"\x93\x01\x02\x03"  # msgpack [1, 2, 3]
    guest.raw(struct.pack(">I", len(body)) + body)


async def _unknown_type(guest: FakeGuest, req: dict[str, Any]) -> None:
    guest.send({"t": "surprise", "id": req["id"]})


async def _never_sent_id(guest: FakeGuest, req: dict[str, Any]) -> None:
    guest.send({"t": "res", "id": 10_000, "ok": True})


async def _duplicate_response(guest: FakeGuest, req: dict[str, Any]) -> None:
    guest.send({"t": "res", "id": req["id"], "ok": True, "pid": 1})
    guest.send({"t": "res", "id": req["id"], "ok": True, "pid": 1})


async def _window_overrun(guest: FakeGuest, req: dict[str, Any]) -> None:
    guest.send({"t": "res", "id": req["id"], "ok": True, "pid": 1})
    chunk = b"x" * wire.CHUNK
    for _ in range(wire.WINDOW // wire.cost(len(chunk)) + 1):
        guest.send({"t": "data", "id": req["id"], "s": "stdout", "d": chunk})


async def _tiny_frame_flood(guest: FakeGuest, req: dict[str, Any]) -> None:
    guest.send({"t": "res", "id": req["id"], "ok": True, "pid": 1})
    for _ in range(wire.WINDOW // wire.FRAME_COST + 1):
        guest.send({"t": "data", "id": req["id"], "s": "stdout", "d": b"x"})


async def _empty_data(guest: FakeGuest, req: dict[str, Any]) -> None:
    guest.send({"t": "res", "id": req["id"], "ok": True, "pid": 1})
    guest.send({"t": "data", "id": req["id"], "s": "stdout", "d": b""})


async def _bogus_exit(guest: FakeGuest, req: dict[str, Any]) -> None:
    guest.send({"t": "res", "id": req["id"], "ok": True, "pid": 1})
    for stream in ("stdout", "stderr"):
        guest.send({"t": "eof", "id": req["id"], "s": stream})
    guest.send({"t": "end", "id": req["id"], "code": "zero", "signal": None})


@pytest.mark.parametrize(
    "behaviour",
    [
        _garbage,
        _oversized,
        _not_a_map,
        _unknown_type,
        _never_sent_id,
        _duplicate_response,
        _window_overrun,
        _tiny_frame_flood,
        _empty_data,
        _bogus_exit,
    ],
)
async def test_hostile_agent_gets_protocol_error_not_a_hang(pair: Pair, behaviour: Hostile) -> None:
    agent, guest = pair
    # Spawn (not run) so the host does not consume output: the window must hold on its own.
    task = asyncio.ensure_future(agent.exec("true").spawn())
    req = await guest.recv_request()
    await behaviour(guest, req)

    async def outcome() -> None:
        process = await task
        await process.wait(timeout=10)

    with pytest.raises(ProtocolError):
        await asyncio.wait_for(outcome(), 10)
    if behaviour is not _bogus_exit:  # a bad exit status fails the call, the rest the channel
        with pytest.raises(ProtocolError):
            await agent.ping(timeout=1)


async def test_hang_up_fails_pending_calls_with_the_owner_error(pair: Pair) -> None:
    agent, guest = pair
    task = asyncio.ensure_future(agent.ping(timeout=5))
    await guest.recv_request()
    guest.close()
    with pytest.raises(VMNotRunning, match="fake VM went away"):
        await task


async def test_host_memory_is_bounded_by_the_window(pair: Pair) -> None:
    agent, guest = pair
    spawn = asyncio.ensure_future(agent.exec("yes").spawn())
    req = await answer(guest, ok=True, pid=7)
    process = await spawn
    chunk = b"y" * wire.CHUNK
    frames = wire.WINDOW // wire.cost(len(chunk))  # as much as the window allows, unread
    for _ in range(frames):
        guest.send({"t": "data", "id": req["id"], "s": "stdout", "d": chunk})
    for _ in range(frames):
        assert await process.stdout.__anext__() == chunk
    acked = 0
    while acked < frames * wire.cost(len(chunk)):  # consuming hands the credit back
        ack = await asyncio.wait_for(guest.recv(), 5)
        assert (ack["t"], ack["s"]) == ("ack", "stdout")
        acked += ack["n"]
    assert acked == frames * wire.cost(len(chunk))


async def test_a_read_that_fails_midway_raises_instead_of_hanging(pair: Pair) -> None:
    """The guest ends a read with an error after some data (an I/O error, a file that would block):
    "end" without "eof" must finish the call, not leave the reader waiting for more."""
    agent, guest = pair
    task = asyncio.ensure_future(agent.read_file("/proc/kmsg", timeout=30))
    req = await answer(guest, ok=True, size=0)
    guest.send({"t": "data", "id": req["id"], "s": "file", "d": b"partial"})
    err = {"kind": "os_error", "msg": "reading would block", "errno": 11, "path": None}
    guest.send({"t": "end", "id": req["id"], "ok": False, "err": err})
    with pytest.raises(CapsaError, match="would block"):
        await asyncio.wait_for(task, 5)


async def _spawned(pair: Pair, *, pty: bool = False) -> tuple[Process, dict[str, Any]]:
    agent, guest = pair
    builder = agent.exec("sleep").arg("9")
    task = asyncio.ensure_future((builder.pty(24, 80) if pty else builder).spawn())
    req = await answer(guest, ok=True, pid=7)
    return await task, req


BAD_CALLS: list[tuple[str, Callable[[Agent, Process], Awaitable[object]]]] = [
    ("resize to -1 rows", lambda a, p: p.resize(-1, 80)),
    ("resize past 16 bits", lambda a, p: p.resize(1 << 40, 80)),
    ("resize with a float", lambda a, p: p.resize(24.5, 80)),  # type: ignore[arg-type]
    ("signal past the C int range", lambda a, p: p.kill(1 << 40)),
    ("signal past SIGRTMAX", lambda a, p: p.kill(65)),
    ("signal 0", lambda a, p: p.kill(0)),
    ("negative signal", lambda a, p: p.kill(-9)),
    ("signal as text", lambda a, p: p.kill("9")),  # type: ignore[arg-type]
    ("signal as a bool", lambda a, p: p.kill(True)),
    ("kill with a NaN timeout", lambda a, p: p.kill(9, timeout=float("nan"))),
    ("wait with a negative timeout", lambda a, p: p.wait(-1)),
    ("stdin as text", lambda a, p: p.write_stdin("text")),  # type: ignore[arg-type]
    ("ping with a negative timeout", lambda a, p: a.ping(timeout=-1)),
    ("ping with an infinite timeout", lambda a, p: a.ping(timeout=float("inf"))),
    ("ping with a NaN timeout", lambda a, p: a.ping(timeout=float("nan"))),
    ("mkdir with a mode past 12 bits", lambda a, p: a.mkdir("/tmp/x", mode=0o17777)),
    ("mkdir with a negative mode", lambda a, p: a.mkdir("/tmp/x", mode=-1)),
    ("write_file with a mode as text", lambda a, p: a.write_file("/x", b"", mode="644")),  # type: ignore[arg-type]
    ("write_file with a zero timeout", lambda a, p: a.write_file("/x", b"", timeout=0)),
    ("read_file with a negative limit", lambda a, p: a.read_file("/x", limit=-1)),
    ("list_dir with a timeout as text", lambda a, p: a.list_dir("/", timeout="5")),  # type: ignore[arg-type]
    ("exec timeout of NaN", lambda a, p: a.exec("true").timeout(float("nan")).run()),
    ("exec timeout of infinity", lambda a, p: a.exec("true").timeout(float("inf")).run()),
    ("terminal of 0 rows", lambda a, p: a.exec("sh").pty(0, 80).spawn()),
]


@pytest.mark.parametrize("call", [c for _, c in BAD_CALLS], ids=[what for what, _ in BAD_CALLS])
async def test_bad_arguments_raise_config_error_before_reaching_the_guest(
    pair: Pair, call: Callable[[Agent, Process], Awaitable[object]]
) -> None:
    """Attack (on the guest agent, through the public API): arguments the guest cannot take (a
    terminal size of -1, a signal past the range, a NaN timeout, a mode past 12 bits) are refused
    with ConfigError on the host, and nothing is sent."""
    agent, guest = pair
    process, _ = await _spawned(pair, pty=True)
    with pytest.raises(ConfigError):
        await asyncio.wait_for(call(agent, process), 2)  # (sent, it would wait for a reply)
    task = asyncio.ensure_future(agent.ping(timeout=5))  # the next thing the guest sees is this
    req = await answer(guest, ok=True)
    await task
    assert req["op"] == "ping"


@pytest.mark.parametrize(
    "reply",
    [
        {"total": 100, "free": 101},  # more free than there is
        {"total": 100, "free": -1},
        {"total": 1 << 62, "free": 0},  # no filesystem is that big
        {"total": True, "free": 0},
        {"total": "100", "free": 0},
        {"free": 0},
    ],
)
async def test_a_hostile_disk_usage_reply_is_a_protocol_error(pair: Pair, reply: dict[str, Any]) -> None:
    agent, guest = pair
    task = asyncio.ensure_future(agent.disk_usage("/", timeout=5))
    await answer(guest, ok=True, **reply)
    with pytest.raises(ProtocolError):
        await task


async def test_disk_usage_and_wait_idle(pair: Pair) -> None:
    agent, guest = pair
    task = asyncio.ensure_future(agent.disk_usage("/data", timeout=5))
    req = await guest.recv_request()
    assert (req["op"], req["path"]) == ("disk_usage", "/data")
    assert not await agent.wait_idle(0.05)  # the request is in flight
    guest.send({"t": "res", "id": req["id"], "ok": True, "total": 1000, "free": 250})
    assert await agent.wait_idle(5)
    usage = await task
    assert (usage.total, usage.used, usage.free) == (1000, 750, 250)
