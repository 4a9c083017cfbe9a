"""Attacks on the guest agent's protocol: requests and frames that would kill PID 1 (a dead PID 1 is
a kernel panic: the sandbox is gone) or wedge it (every later call of the host times out).

The fuzz test drives the real guest agent code, not the host client: the agent's own loop serves a
socketpair, as it serves its virtio port in a guest. It runs embedded (``init=False``: no signal
handlers, no reaping of others' children, no power-off, no clock or hostname changes) and, because
the fuzzer makes it run commands and delete paths as root, in a forked child confined to a private
mount, network, UTS, IPC and PID namespace, chrooted into a tmpfs that holds only ``sleep``, ``cat``
and ``true``. Each example sends random and mutated frames, then checks that the agent still answers
a ``ping`` (and that everything it sent is a well-formed frame).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import traceback
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import capsa
from capsa.agent import wire
from capsa.agent.guest import fields
from capsa.agent.guest.main import Agent as GuestAgent
from capsa.errors import CapsaTimeoutError

PTY_ID = 1 << 62  # the harness's own long-running commands, targets for resize/kill/data/ack
PIPE_ID = PTY_ID + 1
PING_BASE = PTY_ID + 2
JAIL_PROGRAMS = ("sleep", "cat", "true")
REPLY_TIMEOUT = 2.0

# -- a confined, embedded agent ---------------------------------------------------------------------

_CLONE_NEWNS, _CLONE_NEWUTS, _CLONE_NEWIPC = 0x20000, 0x4000000, 0x8000000
_CLONE_NEWPID, _CLONE_NEWNET = 0x20000000, 0x40000000
_MS_NOSUID, _MS_BIND, _MS_REC, _MS_PRIVATE = 0x2, 0x1000, 0x4000, 1 << 18
_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    enc = [None if v is None else v.encode() for v in (source, target, fstype, data or None)]
    _check(_libc.mount(enc[0], enc[1], enc[2], ctypes.c_ulong(flags), enc[3]), f"mount {target}")


def _jail_files() -> dict[str, Path]:
    """Paths inside the jail → host files: the programs and the libraries they load."""
    files: dict[str, Path] = {}
    for name in JAIL_PROGRAMS:
        program = Path(shutil.which(name) or f"/bin/{name}")
        files[f"/bin/{name}"] = program
        ldd = subprocess.run(
            ["ldd", str(program)], capture_output=True, text=True, timeout=10, check=True
        )
        for word in ldd.stdout.split():
            if word.startswith("/"):
                files[word] = Path(word)
    return files


def _enter_jail(root: Path, files: dict[str, Path]) -> None:
    """In the agent's process, PID 1 of its new PID namespace: build the jail and chroot into it."""
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)
    _mount("tmpfs", str(root), "tmpfs", _MS_NOSUID, "mode=0755,size=64m")
    for inside, source in files.items():
        target = root / inside.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
    for folder in ("dev/pts", "tmp"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    _mount("devpts", str(root / "dev/pts"), "devpts", _MS_NOSUID, "newinstance,ptmxmode=0666")
    (root / "dev/ptmx").symlink_to("pts/ptmx")
    (root / "dev/null").touch()
    _mount("/dev/null", str(root / "dev/null"), None, _MS_BIND)
    os.chroot(root)
    os.chdir("/")


def _serve_in_jail(fd: int, root: Path, files: dict[str, Path], log: Path) -> int:
    log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(log_fd, 2)
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115 - for the child's life
    _check(_libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL), "prctl")
    flags = _CLONE_NEWNS | _CLONE_NEWUTS | _CLONE_NEWIPC | _CLONE_NEWNET | _CLONE_NEWPID
    _check(_libc.unshare(flags), "unshare")
    pid = os.fork()
    if pid:  # the agent's parent: waits and passes its exit status on
        os.close(fd)  # the host end must see EOF when the agent dies
        _, status = os.waitpid(pid, 0)
        return min(255, abs(os.waitstatus_to_exitcode(status)))
    _check(_libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL), "prctl")
    _enter_jail(root, files)
    GuestAgent(fd, init=False).run()
    return 0


class JailedAgent:
    """The real guest agent in a confined child, and a strict host end of its socketpair."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.files = _jail_files()
        self.log = workdir / "agent.log"
        self.pid = 0
        self.sock: socket.socket | None = None
        self.decoder = wire.FrameDecoder()  # strict: the agent must never send a bad frame
        self.shadow = wire.FrameDecoder(skip_bad=True)  # where the agent's decoder stands
        self.inbox: deque[dict[str, Any]] = deque()
        self.answered: list[int] = []  # ids of the replies the harness did not wait for itself
        self.next_ping = PING_BASE
        self.helpers_alive = False
        self.restarts = 0

    # process

    def start(self) -> None:
        root = self.workdir / f"jail{self.restarts}"
        root.mkdir()
        host, guest = socket.socketpair()
        pid = os.fork()
        if pid == 0:  # never returns into pytest
            code = 1
            try:
                host.close()
                code = _serve_in_jail(guest.fileno(), root, self.files, self.log)
            except BaseException:
                with contextlib.suppress(BaseException):
                    traceback.print_exc()
            finally:
                os._exit(code)
        guest.close()
        host.settimeout(REPLY_TIMEOUT)
        self.pid, self.sock = pid, host
        self.decoder, self.shadow = wire.FrameDecoder(), wire.FrameDecoder(skip_bad=True)
        self.inbox.clear()
        self.restarts += 1
        hello = self.receive()
        assert hello["t"] == "hello" and hello["v"] == wire.PROTOCOL_VERSION, hello
        self.helpers_alive = False

    def stop(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            self.pid = 0

    def exit_status(self, wait: float) -> int | None:
        deadline = time.monotonic() + wait
        while True:
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                self.pid = 0
                return os.waitstatus_to_exitcode(status)
            if time.monotonic() > deadline:
                return None
            time.sleep(0.01)

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    # wire

    def send(self, data: bytes) -> list[dict[str, Any]]:
        """Send raw bytes; returns the messages the agent decodes from them."""
        assert self.sock is not None
        self.sock.sendall(data)
        return self.shadow.feed(data)

    def receive(self) -> dict[str, Any]:
        assert self.sock is not None
        while not self.inbox:
            data = self.sock.recv(1 << 20)
            if not data:
                raise EOFError("the agent closed its end")
            self.inbox.extend(self.decoder.feed(data))
        message = self.inbox.popleft()
        _check_outgoing(message)
        return message

    def request(self, sid: int, op: str, **args: Any) -> dict[str, Any]:
        self.send(wire.encode({"t": "req", "id": sid, "op": op, **args}))
        while True:
            message = self.receive()
            if message["t"] == "res" and message["id"] == sid:
                return message
            self.note(message)

    def note(self, message: dict[str, Any]) -> None:
        if message["t"] == "res":
            self.answered.append(message["id"])
        if message["t"] == "end" and message["id"] in (PTY_ID, PIPE_ID):
            self.helpers_alive = False

    def resync(self) -> list[dict[str, Any]]:
        """Complete any frame the agent holds half of (as a host finishing its write would)."""
        seen: list[dict[str, Any]] = []
        while self.shadow.needed():
            seen += self.send(bytes(self.shadow.needed()))
        return seen

    def ensure_helpers(self) -> None:
        """A command on a terminal and one on pipes, for resize, kill, stdin data and acks."""
        if self.helpers_alive:
            return
        for sid in (PTY_ID, PIPE_ID):
            self.send(wire.encode({"t": "cancel", "id": sid}))
        pty = self.request(PTY_ID, "exec", argv=["sleep", "1000"], pty=[24, 80], stdin=True)
        pipe = self.request(PIPE_ID, "exec", argv=["cat"], stdin=True)
        self.helpers_alive = bool(pty["ok"] and pipe["ok"])

    def ready(self) -> None:
        if not self.pid:
            self.start()
        self.ensure_helpers()
        if not self.helpers_alive:  # the fuzzer removed the jail's programs: start over
            self.stop()
            self.start()
            self.ensure_helpers()
            assert self.helpers_alive, f"cannot run commands in the jail\n{self.log_tail()}"

    def ping(self) -> dict[str, Any]:
        self.next_ping += 1
        return self.request(self.next_ping, "ping")


def _check_outgoing(message: dict[str, Any]) -> None:
    """What a host channel would call a protocol violation."""
    kind = message["t"]
    assert kind in ("hello", "res", "data", "eof", "end", "ack"), message
    if kind != "hello":
        sid = message.get("id")
        assert type(sid) is int and sid > 0, f"agent sent an invalid id: {message!r:.200}"
    if kind == "res":
        assert isinstance(message.get("ok"), bool), message


@pytest.fixture(scope="module")
def jailed_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JailedAgent]:
    if os.geteuid() != 0:
        pytest.skip("the jail for the fuzzed agent needs root (namespaces, mounts, chroot)")
    agent = JailedAgent(tmp_path_factory.mktemp("agent-fuzz"))
    try:
        yield agent
    finally:
        agent.stop()


# -- what the fuzzer sends ----------------------------------------------------------------------------

EXTREMES = [0, 1, -1, 64, 65, 128, 0xFFFF, 0x10000, (1 << 31) - 1, 1 << 31, 1 << 32, (1 << 63) - 1]
EXTREMES += [-(1 << 63), (1 << 64) - 1, PTY_ID, PIPE_ID]
INTS = st.one_of(st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1), st.sampled_from(EXTREMES))
LEAVES = st.one_of(
    st.none(), st.booleans(), INTS, st.floats(), st.text(max_size=16), st.binary(max_size=48)
)
VALUES = st.recursive(
    LEAVES,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
NETWORK = {"mac": "02:00:00:00:00:01", "address": "10.0.2.15/24", "gateway": "10.0.2.2"}
REQUESTS: list[tuple[str, dict[str, Any]]] = [
    ("ping", {}),
    ("info", {}),
    ("exec", {"argv": ["true"], "env": {"A": "1"}, "cwd": "/tmp", "stdin": False}),
    ("exec", {"argv": ["sleep", "0.05"], "pty": [24, 80], "stdin": True}),
    ("kill", {"target": PTY_ID, "signal": int(signal.SIGWINCH)}),
    ("kill", {"target": PIPE_ID, "signal": int(signal.SIGTERM)}),
    ("resize", {"target": PTY_ID, "rows": 40, "cols": 100}),
    ("read_file", {"path": "/bin/true"}),
    ("write_file", {"path": "/tmp/f", "mode": 0o600}),
    ("list_dir", {"path": "/bin"}),
    ("stat", {"path": "/dev/ptmx", "follow": False}),
    ("exists", {"path": "/tmp"}),
    ("mkdir", {"path": "/tmp/a/b", "parents": True, "mode": 0o700}),
    ("remove", {"path": "/tmp/a", "recursive": True}),
    ("refresh", {"entropy": bytes(64), "time": 1.7e9, "hostname": "capsa-fuzz", "network": NETWORK}),
    ("connect", {"port": 1}),  # the jail's network namespace has no address: refused at once
    ("shutdown", {}),
    ("processes", {}),
    ("attach", {"pid": 2}),
]


@st.composite
def requests(draw: st.DrawFn) -> dict[str, Any]:
    """A valid request with a few fields deleted or replaced by extreme or ill-typed values (its own
    arguments most often: that is where the checks are)."""
    op, template = draw(st.sampled_from(REQUESTS))
    message: dict[str, Any] = {"t": "req", "id": draw(st.integers(1, 1 << 40)), "op": op, **template}
    own = sorted(template) or ["op"]
    keys = draw(st.lists(st.sampled_from(own) | st.sampled_from(["t", "id", "op"]), max_size=3))
    for key in keys:
        how = draw(st.sampled_from(["int", "int", "value", "delete"]))
        if how == "delete":
            message.pop(key, None)
        else:
            message[key] = draw(INTS if how == "int" else VALUES)
    if draw(st.integers(0, 3)) == 0:
        message[draw(st.text(max_size=8))] = draw(VALUES)
    return message


STREAM_MESSAGES = st.fixed_dictionaries(
    {
        "t": st.sampled_from(["data", "eof", "ack", "cancel"]) | st.text(max_size=6),
        "id": st.sampled_from([PTY_ID, PIPE_ID]) | INTS | VALUES,
        "s": st.sampled_from(wire.STREAMS) | VALUES,
        "d": st.binary(min_size=1, max_size=64) | VALUES,
        "n": INTS | VALUES,
    }
)
RANDOM_MAPS = st.dictionaries(st.text(max_size=6), VALUES, max_size=5).map(lambda d: {"t": "req", **d})


@st.composite
def chunks(draw: st.DrawFn) -> bytes:
    """One frame of a random message, well-formed or broken, or plain garbage."""
    import msgpack

    message = draw(st.one_of(requests(), requests(), STREAM_MESSAGES, RANDOM_MAPS))
    body: bytes = msgpack.packb(message, use_bin_type=True)
    header = struct.pack(">I", len(body))
    how = draw(st.sampled_from(["frame"] * 7 + ["cut", "length", "huge", "flip", "raw"]))
    if how == "cut":
        return header + body[: draw(st.integers(0, max(0, len(body) - 1)))]
    if how == "length":
        return (
            struct.pack(">I", draw(st.integers(0, 2 * len(body) + 8) | st.just(wire.MAX_FRAME))) + body
        )
    if how == "huge":
        return struct.pack(">I", draw(st.integers(wire.MAX_FRAME + 1, (1 << 32) - 1))) + body
    if how == "flip":
        flipped = bytearray(body)
        flipped[draw(st.integers(0, len(body) - 1))] ^= draw(st.integers(1, 255))
        return header + bytes(flipped)
    if how == "raw":
        return draw(st.binary(min_size=1, max_size=64))
    return header + body


def _is_shutdown(message: dict[str, Any]) -> bool:
    return (
        message.get("t") == "req"
        and message.get("op") == "shutdown"
        and fields.request_id(message.get("id")) is not None
    )


# -- the fuzz test -------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
@settings(
    max_examples=1000,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(frames=st.lists(chunks(), min_size=1, max_size=4))
def test_fuzzed_frames_never_stop_the_agent(jailed_agent: JailedAgent, frames: list[bytes]) -> None:
    """Attack: random and mutated frames (ops of the wrong type, fields of every type, extreme and
    negative integers, garbage, truncated, oversized or lying length prefixes) sent to the real
    guest agent. Each must be answered or dropped: the agent must still answer a ping after it, and
    never send a frame the host would call a protocol violation."""
    agent = jailed_agent
    seen: list[dict[str, Any]] = []
    stopped = False  # told to shut down: it may answer what came with it, then it must stop
    try:
        agent.ready()
        agent.answered.clear()
        for chunk in frames:
            seen += agent.send(chunk)
        seen += agent.resync()
        stopped = any(_is_shutdown(m) for m in seen)
        reply = agent.ping()
    except (EOFError, OSError) as exc:
        stopped = any(_is_shutdown(m) for m in seen)
        code = agent.exit_status(wait=2.0)
        tail = agent.log_tail()
        agent.stop()
        if stopped and code == 0:
            return  # asked to shut down: it did (a fresh agent serves the next example)
        pytest.fail(f"the agent stopped serving ({exc!r}, exit status {code}) after {frames!r:.3000}"
                    f"\n--- agent log ---\n{tail}")  # fmt: skip
    assert reply == {"t": "res", "id": agent.next_ping, "ok": True}
    asked = [fields.request_id(m.get("id")) for m in seen if m.get("t") == "req"]
    if not stopped:  # every request with a usable id got exactly one reply, in order
        assert agent.answered == [sid for sid in asked if sid is not None]
    if stopped:
        assert agent.exit_status(wait=2.0) in (0, None)
        agent.stop()  # (None: its id was in use, so it was refused)
        return
    for message in seen:  # stop what the example started (a sleep, a cat)
        sid = message.get("id")
        if message.get("t") == "req" and type(sid) is int and 0 < sid < PTY_ID:
            agent.send(wire.encode({"t": "cancel", "id": sid}))


# -- the known killers, against a real guest ---------------------------------------------------------

KILLERS: list[tuple[str, Any, dict[str, Any]]] = [
    # (what, op, arguments); "target" is filled in with a running command on a terminal
    ("a terminal resized to -1 rows (struct.error)", "resize", {"rows": -1, "cols": 80}),
    ("a terminal resized past 16 bits", "resize", {"rows": 1 << 40, "cols": 80}),
    ("a signal number past the C int range (OverflowError)", "kill", {"signal": 1 << 40}),
    ("a signal number past SIGRTMAX", "kill", {"signal": 1000}),
    ("a negative signal number", "kill", {"signal": -1}),
    ("an unhashable op (a list)", [1, 2], {}),
    ("an unhashable op (a map)", {"op": "ping"}, {}),
    ("a command on a terminal of -1 rows", "exec", {"argv": ["true"], "pty": [-1, 80], "stdin": True}),
    ("a clock past time_t (OverflowError)", "refresh", {"time": 1e300}),
    ("a clock of NaN", "refresh", {"time": float("nan")}),
    ("a clock as a huge integer", "refresh", {"time": (1 << 64) - 1}),
    ("a mode past 12 bits", "mkdir", {"path": "/tmp/m", "mode": 1 << 40}),
    ("environment names with '='", "exec", {"argv": ["true"], "env": {"A=B": "1"}}),
]


@pytest.mark.vm
@pytest.mark.asyncio
@pytest.mark.timeout(240)
async def test_known_killers_get_an_error_and_the_agent_keeps_serving(sandbox: capsa.Sandbox) -> None:
    """Attack: requests that used to raise out of the agent's dispatch and kill PID 1 (a kernel
    panic), sent at the wire level past the host's argument checks: a bad terminal size, signal
    numbers out of range, an unhashable op, a clock that overflows. Each must get a bad_request
    reply; the agent must then answer a ping and run a command."""
    agent = sandbox.agent
    channel = agent.channel
    terminal = await agent.exec("sleep").arg("600").pty(24, 80).spawn()
    try:
        for what, op, extra in KILLERS:
            args = dict(extra)
            if op in ("resize", "kill"):
                args["target"] = terminal._call.id
            if op == "refresh":
                args |= {"entropy": os.urandom(64), "hostname": "capsa-attack"}
            try:
                reply = await channel.request(op, args, timeout=15)
                await agent.ping(timeout=15)
            except capsa.CapsaError as exc:
                pytest.fail(f"{what}: the agent stopped serving: {exc!r}")
            assert reply["ok"] is False, what
            assert reply["err"]["kind"] == "bad_request", (what, reply)
    finally:
        with contextlib.suppress(capsa.CapsaError):
            await terminal.kill()
            await terminal.wait(15)
    assert (await agent.exec("echo").arg("alive").run()).stdout == "alive\n"


@pytest.mark.vm
@pytest.mark.asyncio
@pytest.mark.timeout(240)
async def test_bad_frames_and_ids_leave_the_channel_working(sandbox: capsa.Sandbox) -> None:
    """Attack: frames the agent cannot decode (garbage body, an oversized length prefix) and
    requests with ids no reply can carry (negative, boolean): the agent must drop them without
    dying and without answering (a reply to id -5 would break the host's channel)."""
    agent = sandbox.agent
    writer = agent.channel._writer
    assert writer is not None
    writer.write(struct.pack(">I", 5) + b"\xc1" * 5)  # a body that is not msgpack
    writer.write(wire.encode({"t": "req", "id": -5, "op": "ping"}))
    writer.write(wire.encode({"t": "req", "id": True, "op": "ping"}))
    writer.write(wire.encode({"t": "req", "id": 0, "op": "ping"}))
    writer.write(struct.pack(">I", wire.MAX_FRAME + 1))  # announces more than a frame may hold
    await writer.drain()
    for _ in range(3):
        await agent.ping(timeout=15)
    assert (await agent.exec("echo").arg("alive").run()).stdout == "alive\n"


@pytest.mark.vm
@pytest.mark.asyncio
@pytest.mark.timeout(240)
async def test_guest_made_traps_do_not_wedge_the_agent(sandbox: capsa.Sandbox) -> None:
    """Attack: guest code plants a FIFO and a symlink to /proc/kmsg where the host will write and
    read files. The single-threaded agent would block for ever in open() of the FIFO or read() of
    kmsg, and every later call of the host would time out. Both must fail fast instead."""
    agent = sandbox.agent
    plant = "mkfifo /tmp/fifo && ln -s /proc/kmsg /tmp/log"
    assert (await agent.exec("sh").args(["-c", plant]).run()).exit_code == 0
    for attempt in (
        agent.write_file("/tmp/fifo", b"x", timeout=15),
        agent.read_file("/tmp/log", timeout=15),
    ):
        started = time.monotonic()
        with contextlib.suppress(capsa.CapsaError):
            try:
                await attempt
            except CapsaTimeoutError:
                pytest.fail("the agent blocked on a file the guest planted")
        assert time.monotonic() - started < 10
    await agent.ping(timeout=15)
    assert (await agent.exec("echo").arg("alive").run()).stdout == "alive\n"


HOSTILE_PORTS: list[Any] = [
    0,
    -1,
    65536,
    70000,
    (1 << 64) - 1,
    -(1 << 63),
    "80",
    80.0,
    True,
    None,
    [80],
    {},
]


@pytest.mark.vm
@pytest.mark.asyncio
@pytest.mark.timeout(240)
async def test_hostile_connect_requests_get_errors_and_the_agent_keeps_serving(
    sandbox: capsa.Sandbox,
) -> None:
    """Attack: ``connect`` requests for ports no socket call accepts (0, negative, past 65535,
    beyond 64 bits, strings, floats, booleans, lists) sent at the wire level past the host's
    checks, a connect to a port nothing listens on, and a guest server that never reads what it is
    sent while the host keeps writing. Each must get an error (or back-pressure), never kill or
    wedge PID 1: the agent then still answers a ping and relays a real connection."""
    agent = sandbox.agent
    channel = agent.channel
    for port in HOSTILE_PORTS:
        reply = await channel.request("connect", {"port": port}, timeout=15)
        assert reply["ok"] is False and reply["err"]["kind"] == "bad_request", (port, reply)
        assert "'port'" in reply["err"]["msg"], reply
    missing = await channel.request("connect", {}, timeout=15)
    assert missing["ok"] is False and missing["err"]["kind"] == "bad_request"
    refused = await channel.request("connect", {"port": 9}, timeout=15)
    assert refused["ok"] is False and refused["err"]["errno"] == 111  # ECONNREFUSED, at once
    await agent.ping(timeout=15)
    # a server that accepts and never reads: the host's writes stop at the window, the agent is free
    server = "import socket,time; s=socket.socket(); s.bind(('127.0.0.1',7100)); s.listen(); " \
        "c=s.accept(); print('accepted', flush=True); time.sleep(600)"  # fmt: skip
    sink = await agent.exec("python3").args(["-c", server]).spawn()
    try:
        for _ in range(100):
            try:
                _reader, writer = await agent.open_connection(7100, timeout=15)
                break
            except capsa.AgentError:
                await asyncio.sleep(0.1)
        else:
            pytest.fail("the sink server did not start")
        writer.write(os.urandom(32 << 20))
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(5):
                await writer.drain()  # blocked by the credit window, as it should be
        await agent.ping(timeout=15)
        assert (await agent.exec("echo").arg("alive").run()).stdout == "alive\n"
        writer.close()
        await writer.wait_closed()
    finally:
        await sink.kill()
