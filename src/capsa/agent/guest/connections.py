"""The agent's ``connect`` operation: one TCP connection to a port of the guest's loopback, relayed
as a pair of streams (``stdin`` host → guest, ``stdout`` guest → host) with the usual credit.

This is how ingress reaches a server in the sandbox without the sandbox having a network interface:
the host asks the agent to connect to ``127.0.0.1:port`` and every byte travels over the agent's
port. The agent never listens and never connects anywhere but the guest's own loopback, so ingress
gives the sandbox no egress.

Limits: at most :data:`MAX_CONNECTIONS` at once (past it the request fails with ``EMFILE``), a
connect that has not completed after :data:`CONNECT_TIMEOUT` seconds fails with ``ETIMEDOUT``. An
end of stream travels each way as ``eof`` (a half-close: ``shutdown(SHUT_WR)`` on the guest
socket); a reset or any socket error ends the request with an ``end`` carrying the error; a
``cancel`` from the host closes the socket with a reset.
"""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import socket
import struct
import time
from collections import deque
from collections.abc import Iterable
from typing import Any, Protocol

import msgpack

from capsa.agent import wire
from capsa.agent.guest.sessions import BadRequest, Message, Outbox, error_body, log

MAX_CONNECTIONS = 1024
CONNECT_TIMEOUT = 10.0
RECV_SIZE = wire.CHUNK  # one recv takes what the socket holds, up to a frame
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset


class Host(Protocol):
    """What a connection needs from the agent that owns it."""

    outbox: Outbox

    def close_fd(self, fd: int) -> None: ...

    def forget(self, session: ConnectSession) -> None: ...


class Agent(Host, Protocol):
    """What :func:`op_connect` needs: a host that also keeps the sessions."""

    sessions: dict[int, Any]


_fd_limit_raised = False


def op_connect(agent: Agent, sid: int, m: Message) -> None:
    """The ``connect`` operation: answered once the connection is made (or has failed)."""
    global _fd_limit_raised
    port = port_of(m)
    check_room(agent.sessions.values())
    if not _fd_limit_raised:
        _fd_limit_raised = True
        raise_fd_limit()
    session = ConnectSession(agent, sid, port)
    agent.sessions[sid] = session
    if session.connected:
        session.on_connected()


def send_data(outbox: Outbox, sid: int, data: bytes) -> None:
    """Queue ``{"t": "data", "id": sid, "s": "stdout", "d": data}`` without copying ``data`` into
    an encoded frame: the map is encoded with an empty payload, whose 2-byte ``bin 8`` header is
    replaced by a ``bin 32`` header for the real one, and the payload is queued as it is (under
    TCG every copy in the guest costs: this is one per relayed byte less)."""
    envelope: bytes = msgpack.packb({"t": "data", "id": sid, "s": "stdout", "d": b""}, use_bin_type=True)
    prefix = envelope[:-2] + b"\xc6" + len(data).to_bytes(4, "big")  # (b"" packs as c4 00, last)
    outbox.chunks.append(memoryview((len(prefix) + len(data)).to_bytes(4, "big") + prefix))
    outbox.chunks.append(memoryview(data))
    outbox.size += 4 + len(prefix) + len(data)


def port_of(m: Message) -> int:
    value = m.get("port")
    if type(value) is not int or not 1 <= value <= 65535:
        raise BadRequest("'port' must be an integer from 1 to 65535")
    return value


class ConnectSession:
    """One relayed TCP connection. ``replied`` turns true when the connect completes (the agent
    answers the request then); until it does the socket is watched for writability only."""

    def __init__(self, agent: Host, sid: int, port: int) -> None:
        self.agent = agent
        self.id = sid
        self.port = port
        self.sock: socket.socket | None = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        self.fd = self.sock.fileno()
        self.started = time.monotonic()
        self.connected = False
        self.credit = wire.WINDOW  # guest → host
        self.pending: deque[tuple[memoryview, int]] = deque()  # host → guest, not yet written
        self.owed = 0
        self.host_eof = False  # the host sent eof on stdin
        self.write_closed = False  # we shut down our sending side
        self.read_done = False  # the guest server ended its side: eof sent to the host
        code = self.sock.connect_ex(("127.0.0.1", port))
        if code == 0:
            self.connected = True
        elif code not in (errno.EINPROGRESS, errno.EAGAIN):
            self.sock.close()
            self.sock = None
            raise OSError(code, f"connect to guest port {port}: {os.strerror(code)}")

    # -- the agent loop asks --

    def events(self, room: bool) -> int:
        if self.sock is None:
            return 0
        if not self.connected:
            return selectors.EVENT_WRITE
        wanted = 0
        if room and not self.read_done and self.credit > wire.FRAME_COST:
            wanted |= selectors.EVENT_READ
        if self.pending:
            wanted |= selectors.EVENT_WRITE
        return wanted

    def on_event(self, mask: int) -> None:
        if self.sock is None:
            return
        if not self.connected:
            code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code != 0:
                self.refuse(OSError(code, f"connect to guest port {self.port}: {os.strerror(code)}"))
                return
            self.connected = True
            self.on_connected()
            self.pump()  # what came with the connect (a request head) goes now, not a loop later
            return
        if mask & selectors.EVENT_WRITE:
            self.pump()
        if mask & selectors.EVENT_READ and self.sock is not None:
            self.receive()

    def check_timeout(self, now: float) -> None:
        if not self.connected and self.sock is not None and now - self.started > CONNECT_TIMEOUT:
            message = f"connect to guest port {self.port}: no answer within {CONNECT_TIMEOUT:.0f}s"
            self.refuse(OSError(errno.ETIMEDOUT, message))

    # -- lifecycle --

    def on_connected(self) -> None:
        """Answer the request: from now on bytes flow."""
        self.agent.outbox.send({"t": "res", "id": self.id, "ok": True, "port": self.port})

    def refuse(self, exc: OSError) -> None:
        self.agent.outbox.send({"t": "res", "id": self.id, "ok": False, "err": error_body(exc)})
        self.close(reset=False)

    def fail(self, exc: OSError) -> None:
        """A socket error after the connect (a reset): the request ends with it."""
        self.agent.outbox.send({"t": "end", "id": self.id, "ok": False, "err": error_body(exc)})
        self.close(reset=True)

    def maybe_finish(self) -> None:
        if self.read_done and self.write_closed:
            self.agent.outbox.send({"t": "end", "id": self.id, "ok": True})
            self.close(reset=False)

    def close(self, *, reset: bool) -> None:
        self.release_pending()
        if self.sock is not None:
            if reset:
                with contextlib.suppress(OSError):
                    self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            self.agent.close_fd(self.sock.detach())
            self.sock = None
        self.agent.forget(self)

    def release_pending(self) -> None:
        for _, charge in self.pending:
            self.agent.outbox.send({"t": "ack", "id": self.id, "s": "stdin", "n": charge})
        self.pending.clear()
        self.owed = 0

    # -- guest → host --

    def receive(self) -> None:
        assert self.sock is not None
        try:
            data = self.sock.recv(min(RECV_SIZE, self.credit - wire.FRAME_COST))
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.fail(exc)
            return
        if not data:
            self.read_done = True
            self.agent.outbox.send({"t": "eof", "id": self.id, "s": "stdout"})
            self.maybe_finish()
            return
        self.credit -= wire.cost(len(data))
        send_data(self.agent.outbox, self.id, data)

    def on_ack(self, stream: str, n: int) -> None:
        if stream == "stdout":
            self.credit = min(wire.WINDOW, self.credit + n)

    # -- host → guest --

    def on_data(self, stream: str, data: bytes) -> None:
        if stream != "stdin" or self.host_eof:
            return
        charge = wire.cost(len(data))
        if self.sock is None or self.write_closed:
            self.agent.outbox.send({"t": "ack", "id": self.id, "s": "stdin", "n": charge})
            return
        if self.owed + charge > wire.WINDOW:
            log(f"the host overran the window of connection {self.id}; data dropped")
            return
        self.owed += charge
        self.pending.append((memoryview(data), charge))
        if self.connected:
            self.pump()

    def on_eof(self, stream: str) -> None:
        if stream == "stdin" and not self.host_eof:
            self.host_eof = True
            if self.connected:
                self.pump()

    def pump(self) -> None:
        while self.pending and self.sock is not None:
            view, charge = self.pending[0]
            try:
                n = self.sock.send(view)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.fail(exc)
                return
            if n < len(view):
                self.pending[0] = (view[n:], charge)
                continue
            self.pending.popleft()
            self.owed -= charge
            self.agent.outbox.send({"t": "ack", "id": self.id, "s": "stdin", "n": charge})
        if self.host_eof and not self.pending and not self.write_closed and self.sock is not None:
            self.write_closed = True
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError as exc:
                self.fail(exc)
                return
            self.maybe_finish()

    def cancel(self) -> None:
        self.close(reset=True)


FD_ROOM = MAX_CONNECTIONS + 1024  # the agent's own fds (pipes of commands, files) besides sockets


def raise_fd_limit() -> None:
    """Make room for :data:`MAX_CONNECTIONS` sockets beside the agent's other fds (the default soft
    limit of 1024 would run out first). Done on the first connection only, so a sandbox that never
    uses ingress keeps its defaults (commands inherit the agent's limit)."""
    import resource  # noqa: PLC0415 - only when connections are used: keeps cold start short

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= FD_ROOM:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (FD_ROOM, max(hard, FD_ROOM)))
    except (OSError, ValueError) as exc:  # not root (an embedded agent): keep what we have
        log(f"could not raise the fd limit to {FD_ROOM}: {exc}")


def check_room(sessions: Iterable[object]) -> None:
    """Refuse a new connection past :data:`MAX_CONNECTIONS` (each holds a socket and two windows)."""
    if sum(1 for s in sessions if isinstance(s, ConnectSession)) >= MAX_CONNECTIONS:
        message = f"too many connections through the agent (limit {MAX_CONNECTIONS})"
        raise OSError(errno.EMFILE, message)


__all__ = ["MAX_CONNECTIONS", "ConnectSession", "check_room", "op_connect", "port_of", "raise_fd_limit"]
