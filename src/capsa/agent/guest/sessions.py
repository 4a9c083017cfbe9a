"""Sessions of the guest agent: one per streaming request (an exec, a file read or write), plus the
outbox that queues frames for the host. See :mod:`capsa.agent.guest.main` for the loop."""

from __future__ import annotations

import errno
import os
import selectors
import signal
import subprocess
import sys
import time
from collections import deque
from typing import Any, Protocol

from capsa.agent import wire

PIPE_READ = 256 << 10
OUTBOX_HIGH = 4 << 20  # stop reading pipes and files while this much is queued for the host
HOLD_LIMIT = 1 << 20  # output kept per stream while no host is attached; past it the pipe blocks
EXIT_GRACE = 0.5  # after the child exits, how long an idle inherited pipe may delay the "end"
_ERRNO_KIND = {
    errno.ENOENT: "not_found",
    errno.EACCES: "permission",
    errno.EPERM: "permission",
    errno.EROFS: "permission",
    errno.EEXIST: "exists",
    errno.EISDIR: "is_a_directory",
    errno.ENOTDIR: "not_a_directory",
    errno.ENOTEMPTY: "not_empty",
}

_TRANSIENT = (errno.ENOMEM, errno.ENOBUFS, errno.ENOSPC)

Message = dict[str, Any]


class Host(Protocol):
    """What a session needs from the agent that owns it."""

    outbox: Outbox

    def close_fd(self, fd: int) -> None: ...

    def forget(self, session: Session) -> None: ...


class BadRequest(Exception):
    """A request the agent refuses; ``kind`` is the error kind its reply carries."""

    kind = "bad_request"


def log(text: str) -> None:
    sys.stderr.write(f"capsa-agent: {text}\n")
    sys.stderr.flush()


def safe_text(value: str) -> str:
    """``value`` made encodable as UTF-8: names from the guest's filesystem (or its hostname) may
    hold bytes that are not UTF-8, which Python keeps as lone surrogates."""
    if value.isascii():
        return value
    try:
        raw = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = value.encode("utf-8", "replace")
    return raw.decode("utf-8", "replace")


def error_body(exc: BaseException) -> dict[str, Any]:
    """The ``err`` map of a reply; never raises, and always encodes."""
    if isinstance(exc, OSError):
        kind = _ERRNO_KIND.get(exc.errno or 0, "os_error")
        path = safe_text(exc.filename[:4096]) if isinstance(exc.filename, str) else None
        errno_ = exc.errno if isinstance(exc.errno, int) else None
        msg = exc.strerror if isinstance(exc.strerror, str) else str(exc)
        return {"kind": kind, "msg": safe_text(msg[:1000]), "errno": errno_, "path": path}
    msg = str(exc) if isinstance(exc, BadRequest) else f"{type(exc).__name__}: {exc}"
    kind = exc.kind if isinstance(exc, BadRequest) else "bad_request"
    return {"kind": kind, "msg": safe_text(msg[:1000]), "errno": None, "path": None}


class Outbox:
    """Frames queued for the host, written without blocking as the port accepts them."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.chunks: deque[memoryview] = deque()
        self.size = 0

    def send(self, message: Message) -> None:
        header, body = wire.encode_parts(message)
        parts = (header, body) if len(body) >= 1 << 16 else (header + body,)  # one write if small
        for part in parts:
            self.chunks.append(memoryview(part))
            self.size += len(part)

    def flush(self) -> None:
        stalls = 0
        while self.chunks:
            head = self.chunks[0]
            try:
                n = os.write(self.fd, head)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in _TRANSIENT:  # the port's kmalloc failed: memory is short, retry
                    time.sleep(0.005)
                    return
                # The host end is gone (a closed socket, an unplugged port): what is queued can
                # never be delivered.
                log(f"writing to the host failed ({exc}); dropping {self.size} queued bytes")
                self.chunks.clear()
                self.size = 0
                return
            if n <= 0:  # virtio_console returns 0 when it could not queue the buffer just now:
                stalls += 1  # retry at once (the fast path of bulk transfers), but not for ever
                if stalls > 10_000:
                    return
                continue
            self.size -= n
            if n == len(head):
                self.chunks.popleft()
            else:
                self.chunks[0] = head[n:]

    def send_raw(self, data: bytes) -> None:
        """Queue bytes outside any frame (the resynchronisation marker a new host looks for)."""
        self.chunks.append(memoryview(data))
        self.size += len(data)

    def clear(self) -> None:
        """Drop what is queued: frames for a host that is gone (a restored guest's old host)."""
        self.chunks.clear()
        self.size = 0

    def flush_blocking(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self.fd, selectors.EVENT_WRITE)
            while self.chunks and time.monotonic() < deadline:
                sel.select(0.05)
                self.flush()


# -- sessions (one per streaming request) ----------------------------------------------------------


class OutStream:
    """A guest → host stream fed from a pipe: data is read only while the host has granted credit.

    Data sent and not yet acknowledged is kept (``unacked``, at most one window): if the host goes
    away (a restored copy of this guest has a new host) it was maybe never delivered, so it goes back
    in front of ``held``, the output read while no host is attached (at most :data:`HOLD_LIMIT`
    bytes, then the pipe is left unread and the process blocks: back-pressure, never loss)."""

    def __init__(self, agent: Host, name: str, fd: int) -> None:
        self.agent = agent
        self.name = name
        self.fd: int | None = fd
        self.credit = wire.WINDOW
        self.last_data = time.monotonic()
        self.held: deque[bytes] = deque()
        self.held_size = 0
        self.unacked: deque[bytes] = deque()
        self.eof_sent = False

    def can_read(self, attached: bool = True) -> bool:
        if self.fd is None:
            return False
        if attached:
            return not self.held and self.credit > wire.FRAME_COST
        return self.held_size < HOLD_LIMIT

    def hold(self, data: bytes, front: bool = False) -> None:
        if front:
            self.held.appendleft(data)
        else:
            self.held.append(data)
        self.held_size += len(data)

    def detach(self) -> None:
        while self.unacked:
            self.hold(self.unacked.pop(), front=True)
        self.credit = wire.WINDOW
        self.eof_sent = False

    def close(self) -> None:
        if self.fd is not None:
            self.agent.close_fd(self.fd)
            self.fd = None


class ExecSession:
    def __init__(self, agent: Host, sid: int, popen: subprocess.Popen[bytes], fds: dict[str, int]):
        self.agent = agent
        self.id = sid
        self.popen = popen
        self.pid = popen.pid
        self.outs = {name: OutStream(agent, name, fd) for name, fd in fds.items() if name != "stdin"}
        self.stdin_fd: int | None = fds.get("stdin")
        self.stdin_pending: deque[tuple[memoryview, int]] = deque()
        self.stdin_owed = 0  # credit the host has spent and not got back: at most one window
        self.stdin_eof = False
        self.status: int | None = None
        self.reaped_at = 0.0
        self.pty_fd: int | None = None  # the terminal's master side, for resizes
        self.attached = True  # bound to request ``id`` of the connected host
        self.argv = [str(a) for a in popen.args] if isinstance(popen.args, list | tuple) else []
        self.started = time.time()

    # host → child stdin
    def on_data(self, stream: str, data: bytes) -> None:
        if stream != "stdin" or not self.attached:
            return
        charge = wire.cost(len(data))
        if self.stdin_fd is None:
            self.agent.outbox.send({"t": "ack", "id": self.id, "s": "stdin", "n": charge})
            return
        if self.stdin_owed + charge > wire.WINDOW:
            log(f"the host overran the stdin window of request {self.id}; data dropped")
            return
        self.stdin_owed += charge
        self.stdin_pending.append((memoryview(data), charge))
        self.pump_stdin()

    def on_eof(self, stream: str) -> None:
        if stream == "stdin":
            self.stdin_eof = True
            self.pump_stdin()

    def pump_stdin(self) -> None:
        while self.stdin_pending and self.stdin_fd is not None:
            view, charge = self.stdin_pending[0]
            try:
                n = os.write(self.stdin_fd, view)
            except BlockingIOError:
                return
            except OSError:  # the child closed its stdin: drop what is left, keep the host unblocked
                self.close_stdin()
                return
            if n < len(view):
                self.stdin_pending[0] = (view[n:], charge)
                continue
            self.stdin_pending.popleft()
            self.stdin_owed -= charge
            if charge:  # zero: sent by a host that is gone
                self.agent.outbox.send({"t": "ack", "id": self.id, "s": "stdin", "n": charge})
        if self.stdin_eof and not self.stdin_pending:
            self.close_stdin()

    def close_stdin(self) -> None:
        for _, charge in self.stdin_pending:
            if charge and self.attached:
                self.agent.outbox.send({"t": "ack", "id": self.id, "s": "stdin", "n": charge})
        self.stdin_pending.clear()
        self.stdin_owed = 0
        if self.stdin_fd is not None:
            self.agent.close_fd(self.stdin_fd)
            self.stdin_fd = None

    # child stdout/stderr → host
    def on_readable(self, out: OutStream) -> None:
        assert out.fd is not None
        room = out.credit - wire.FRAME_COST if self.attached else HOLD_LIMIT - out.held_size
        try:
            data = os.read(out.fd, min(PIPE_READ, room))
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.end_stream(out)
            return
        out.last_data = time.monotonic()
        if self.attached:
            self.send_data(out, data)
        else:
            out.hold(data)

    def send_data(self, out: OutStream, data: bytes) -> None:
        out.credit -= wire.cost(len(data))
        out.unacked.append(data)
        self.agent.outbox.send({"t": "data", "id": self.id, "s": out.name, "d": data})

    def end_stream(self, out: OutStream) -> None:
        out.close()
        self.pump()

    def on_ack(self, stream: str, n: int) -> None:
        out = self.outs.get(stream)
        if out is None:
            return
        out.credit += n
        while out.unacked and n >= wire.cost(len(out.unacked[0])):  # acks cover whole frames
            n -= wire.cost(len(out.unacked.popleft()))

    # -- detached from the host, and attached again --

    def detach(self) -> None:
        """The host is gone: keep the process, keep its output (unacknowledged output included)."""
        self.attached = False
        for out in self.outs.values():
            out.detach()
        self.stdin_pending = deque((view, 0) for view, _ in self.stdin_pending)
        self.stdin_owed = 0

    def attach(self, sid: int) -> None:
        """Bind to request ``sid`` of the host now connected; :meth:`pump` then delivers what was
        kept, and live output after it."""
        self.id = sid
        self.attached = True

    def deliver(self) -> None:
        """After the reply to ``attach``: a terminal's (empty) stderr ends, the rest follows."""
        if "stderr" not in self.outs:
            self.agent.outbox.send({"t": "eof", "id": self.id, "s": "stderr"})
        self.pump()

    def pump(self) -> None:
        """Send kept output while the host's credit lasts, then each stream's end, then the exit."""
        if not self.attached:
            return
        for out in self.outs.values():
            while out.held and out.credit > wire.FRAME_COST and self.agent.outbox.size < OUTBOX_HIGH:
                head = out.held.popleft()
                room = min(out.credit - wire.FRAME_COST, wire.CHUNK)
                if len(head) > room:
                    out.held.appendleft(head[room:])
                    head = head[:room]
                out.held_size -= len(head)
                self.send_data(out, head)
            if out.fd is None and not out.held and not out.eof_sent:
                out.eof_sent = True
                self.agent.outbox.send({"t": "eof", "id": self.id, "s": out.name})
        self.maybe_finish()

    def grace_pending(self) -> bool:
        return self.status is not None and any(out.fd is not None for out in self.outs.values())

    def describe(self) -> dict[str, Any]:
        """This process for the ``processes`` listing (bounded: argv cut to 64 words of 256)."""
        code = sig = None
        if self.status is not None:
            if os.WIFSIGNALED(self.status):
                sig = os.WTERMSIG(self.status)
            else:
                code = os.WEXITSTATUS(self.status)
        return {
            "pid": self.pid,
            "argv": [safe_text(arg[:256]) for arg in self.argv[:64]],
            "pty": "stderr" not in self.outs,
            "started": self.started,
            "attached": self.attached,
            "running": self.status is None,
            "code": code,
            "signal": sig,
        }

    def on_reaped(self, status: int) -> None:
        self.status = status
        self.reaped_at = time.monotonic()
        self.popen.returncode = os.waitstatus_to_exitcode(status)
        self.maybe_finish()

    def check_grace(self, now: float) -> None:
        """A background process that inherited the pipes must not hold back the exit forever."""
        if self.status is None or now - self.reaped_at < EXIT_GRACE:
            return
        for out in list(self.outs.values()):
            if out.can_read(self.attached) and now - out.last_data >= EXIT_GRACE:
                self.end_stream(out)

    def maybe_finish(self) -> None:
        if not self.attached or self.status is None:
            return
        if any(out.fd is not None or not out.eof_sent for out in self.outs.values()):
            return
        code = sig = None
        if os.WIFSIGNALED(self.status):
            sig = os.WTERMSIG(self.status)
        else:
            code = os.WEXITSTATUS(self.status)
        self.close_stdin()
        self.agent.outbox.send({"t": "end", "id": self.id, "code": code, "signal": sig})
        self.agent.forget(self)

    def signal(self, signum: int) -> None:
        try:
            os.killpg(self.pid, signum)
        except ProcessLookupError:
            if self.status is None:
                os.kill(self.pid, signum)

    def cancel(self) -> None:
        self.signal(signal.SIGKILL)


class ReadSession:
    """Sends one file as a ``file`` stream. Regular files cannot be polled, so the loop calls
    :meth:`produce` while credit lasts and the outbox has room."""

    def __init__(self, agent: Host, sid: int, fd: int, payload: bytes | None = None) -> None:
        self.agent = agent
        self.id = sid
        self.fd = fd
        self.payload = memoryview(payload) if payload is not None else None
        self.credit = wire.WINDOW

    def ready(self) -> bool:
        return self.credit > wire.FRAME_COST and self.agent.outbox.size < OUTBOX_HIGH

    def produce(self) -> None:
        size = min(wire.CHUNK, self.credit - wire.FRAME_COST)
        if self.payload is not None:
            data = bytes(self.payload[:size])
            self.payload = self.payload[size:]
        else:
            try:
                data = os.read(self.fd, size)
            except BlockingIOError:  # a "regular" file that would block, such as /proc/kmsg
                message = "reading would block (not a plain file)"
                self.fail(OSError(errno.EAGAIN, message))
                return
            except OSError as exc:
                self.fail(exc)
                return
        if not data:
            self.agent.outbox.send({"t": "eof", "id": self.id, "s": "file"})
            self.close()
            return
        self.credit -= wire.cost(len(data))
        self.agent.outbox.send({"t": "data", "id": self.id, "s": "file", "d": data})

    def fail(self, exc: OSError) -> None:
        self.agent.outbox.send({"t": "end", "id": self.id, "ok": False, "err": error_body(exc)})
        self.close()

    def on_ack(self, stream: str, n: int) -> None:
        if stream == "file":
            self.credit += n

    def on_data(self, stream: str, data: bytes) -> None:
        pass

    def on_eof(self, stream: str) -> None:
        pass

    def cancel(self) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.agent.forget(self)


class WriteSession:
    """Receives a ``file`` stream into an open file, acknowledging each frame once written."""

    def __init__(self, agent: Host, sid: int, fd: int) -> None:
        self.agent = agent
        self.id = sid
        self.fd = fd

    def on_data(self, stream: str, data: bytes) -> None:
        if stream != "file" or self.fd < 0:
            return
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError as exc:
            self.finish({"ok": False, "err": error_body(exc)})
            return
        self.agent.outbox.send({"t": "ack", "id": self.id, "s": "file", "n": wire.cost(len(data))})

    def on_eof(self, stream: str) -> None:
        if stream != "file" or self.fd < 0:
            return
        try:
            os.close(self.fd)
        except OSError as exc:
            self.fd = -1
            self.finish({"ok": False, "err": error_body(exc)})
            return
        self.fd = -1
        self.finish({"ok": True})

    def finish(self, body: dict[str, Any]) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.agent.outbox.send({"t": "end", "id": self.id, **body})
        self.agent.forget(self)

    def on_ack(self, stream: str, n: int) -> None:
        pass

    def cancel(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.agent.forget(self)


Session = ExecSession | ReadSession | WriteSession
