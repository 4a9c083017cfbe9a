"""capsa's guest agent. Copied into the sandbox image and run by the guest's ``python3`` as PID 1.

It is one single-threaded ``selectors`` loop, not asyncio: under TCG every line of Python that runs
for the first time is translated by QEMU, and importing asyncio would add a visible share to each cold
start. Being PID 1 it also reaps every orphan in the guest (``waitpid(-1)`` on ``SIGCHLD``).

The protocol is documented in :mod:`capsa.agent.wire`. A dead PID 1 is a kernel panic (the whole
sandbox is gone), so nothing a request carries may raise out of the loop: every field is checked
(:mod:`capsa.agent.guest.fields`) and answered with a ``bad_request`` error when wrong, a request
whose id no reply could carry is dropped, a frame that does not decode is skipped, and a catch-all at
the request boundary (and one round the whole loop) answers or logs anything else and keeps serving.
Files the guest may have planted (a FIFO, ``/proc/kmsg``) are opened and read without blocking.

This module is the loop (framing, interest, reaping, routing) and the machine's own operations
(``ping``, ``info``, ``refresh``, ``shutdown``); the other operations live by concern in
:mod:`~capsa.agent.guest.commands`, :mod:`~capsa.agent.guest.files`,
:mod:`~capsa.agent.guest.details`, :mod:`~capsa.agent.guest.attach` and
:mod:`~capsa.agent.guest.connections`, each a table of functions of the agent.
"""

from __future__ import annotations

import functools
import os
import selectors
import sys
import time
from collections.abc import Callable
from typing import Any

from capsa.agent import wire
from capsa.agent.guest import attach, commands, connections, details, fields, files
from capsa.agent.guest.connections import ConnectSession
from capsa.agent.guest.init import (
    INIT_ERROR_MARKER,
    StartupError,
    find_port,
    open_power_buttons,
    power_off,
    set_identity,
    startup_failed,
    take_signals,
)
from capsa.agent.guest.link import parse_link_identity
from capsa.agent.guest.sessions import (
    OUTBOX_HIGH,
    BadRequest,
    ExecSession,
    Message,
    Outbox,
    ReadSession,
    Session,
    error_body,
    log,
    safe_text,
)
from capsa.agent.guest.userroot import ImageDefaults, enter_user_root

AGENT_VERSION = "1"
PORT_READ = 2 << 20
__all__ = ["INIT_ERROR_MARKER", "Agent", "StartupError", "main"]


class Agent:
    """Serves one host over ``port_fd`` (the virtio port, or any stream socket).

    ``init=True`` only as the guest's PID 1: it then takes ``SIGCHLD`` and reaps every orphan,
    watches the power button, applies ``refresh`` to the machine and powers off on ``shutdown``.
    An embedded agent (``init=False``, the default: tests serving a socketpair) does none of that:
    it polls for its own children only, ``refresh`` checks its arguments and changes nothing, and
    ``shutdown`` makes :meth:`run` return.
    """

    def __init__(self, port_fd: int, *, init: bool = False) -> None:
        self.init = init
        os.set_blocking(port_fd, False)  # the loop never blocks on the port, only in select()
        self.outbox = Outbox(port_fd)
        self.port_fd = port_fd
        self.decoder = wire.FrameDecoder(skip_bad=True)
        self.sel = selectors.DefaultSelector()
        self.sessions: dict[int, Session | ConnectSession] = {}
        self.by_pid: dict[int, ExecSession] = {}
        self.interest: dict[int, tuple[int, Any]] = {}
        self.power_off = False
        self.image: ImageDefaults | None = None  # a user image's exec defaults (PID 1 in its root)
        self.replied = 0  # the request id the last reply went to
        self.failures = 0  # internal errors survived by the loop
        self.failure_logged = 0.0
        self.ops: dict[str, Callable[[int, Message], None]] = {
            "ping": self.op_ping,
            "info": self.op_info,
            "shutdown": self.op_shutdown,
            "refresh": self.op_refresh,
            "resync": lambda sid, m: attach.op_resync(self, sid, m),
            "processes": lambda sid, m: attach.op_processes(self, sid, m),
            "attach": lambda sid, m: attach.op_attach(self, sid, m),
            "connect": lambda sid, m: connections.op_connect(self, sid, m),
        }
        # commands (commands.py), files (files.py), file owner names and metadata (details.py)
        for table in (commands.OPS, files.OPS, details.OPS):
            for name, op in table.items():
                self.ops[name] = functools.partial(op, self)
        self.wake_fd = -1
        self.power_fds: list[int] = []
        if init:
            self.wake_fd = take_signals()
            self.sel.register(self.wake_fd, selectors.EVENT_READ, "wake")
            self.power_fds = open_power_buttons()
            for fd in self.power_fds:
                self.sel.register(fd, selectors.EVENT_READ, "power")
        self.sel.register(port_fd, selectors.EVENT_READ, "port")
        self.interest[port_fd] = (selectors.EVENT_READ, "port")

    # registration bookkeeping: one epoll_ctl only when interest changes
    def want(self, fd: int, events: int, data: Any) -> None:
        current = self.interest.get(fd)
        if events == 0:
            if current is not None:
                self.sel.unregister(fd)
                del self.interest[fd]
            return
        if current is None:
            self.sel.register(fd, events, data)
        elif current != (events, data):
            self.sel.modify(fd, events, data)
        self.interest[fd] = (events, data)

    def close_fd(self, fd: int) -> None:
        """Unregister before closing: a recycled fd number must not meet a stale selector key."""
        self.want(fd, 0, None)
        os.close(fd)

    def forget(self, session: Session | ConnectSession) -> None:
        if self.sessions.get(session.id) is session:
            del self.sessions[session.id]
        if isinstance(session, ExecSession) and self.by_pid.get(session.pid) is session:
            del self.by_pid[session.pid]

    # -- main loop --

    def run(self) -> None:
        """Serve until ``shutdown`` (or the power button). Returns only for an embedded agent; PID 1
        powers the machine off instead."""
        self.outbox.send({"t": "hello", "v": wire.PROTOCOL_VERSION, "pid": os.getpid()})
        while not self.power_off:
            try:
                self.step()
            except Exception as exc:  # the last line of defence: PID 1 must outlive any bug
                self.survive(exc)
        if self.init:
            self.shutdown_now()
        self.outbox.flush_blocking(2.0)

    def step(self) -> None:
        producing = self.update_interest()
        timeout: float | None = 0 if producing else None
        if any(s.grace_pending() for s in self.by_pid.values()):
            timeout = 0.1 if timeout is None else timeout
        if not self.init and self.by_pid:  # no SIGCHLD wakeups: poll for exits
            timeout = 0.02 if timeout is None else min(timeout, 0.02)
        connecting = any(
            isinstance(s, ConnectSession) and not s.connected for s in self.sessions.values()
        )
        if connecting:  # a connect that never completes must time out
            timeout = 1.0 if timeout is None else min(timeout, 1.0)
        for key, mask in self.sel.select(timeout):
            self.dispatch(key, mask)
        if not self.init:
            self.reap()
        now = time.monotonic()
        for exec_session in list(self.by_pid.values()):  # attached or not
            exec_session.check_grace(now)
        for session in list(self.sessions.values()):
            if isinstance(session, ConnectSession):
                session.check_timeout(now)
        self.outbox.flush()

    def survive(self, exc: Exception) -> None:
        self.failures += 1
        now = time.monotonic()
        if now - self.failure_logged >= 1.0:  # a bug that repeats must not flood the console
            self.failure_logged = now
            log(f"internal error #{self.failures}, still serving: {exc!r:.300}")
        time.sleep(0.01)

    def update_interest(self) -> bool:
        room = self.outbox.size < OUTBOX_HIGH
        producing = False
        for session in list(self.sessions.values()):
            if isinstance(session, ReadSession):
                while session.id in self.sessions and session.ready():
                    session.produce()
                producing = producing or (session.id in self.sessions and session.ready())
            elif isinstance(session, ConnectSession):
                self.want(session.fd, session.events(room), (session, "conn"))
        for exec_session in list(self.by_pid.values()):  # attached or not: processes outlive hosts
            exec_session.pump()
            for out in exec_session.outs.values():
                if out.fd is not None:
                    readable = room and out.can_read(exec_session.attached)
                    self.want(out.fd, selectors.EVENT_READ if readable else 0, (exec_session, out))
            if exec_session.stdin_fd is not None:
                wanted = selectors.EVENT_WRITE if exec_session.stdin_pending else 0
                self.want(exec_session.stdin_fd, wanted, (exec_session, None))
        port_events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.outbox.chunks else 0)
        self.want(self.port_fd, port_events, "port")
        return producing

    def dispatch(self, key: selectors.SelectorKey, mask: int) -> None:
        data = key.data
        if data == "port":
            if mask & selectors.EVENT_WRITE:
                self.outbox.flush()
            if mask & selectors.EVENT_READ:
                self.read_port()
        elif data == "wake":
            try:
                while os.read(self.wake_fd, 512):
                    pass
            except BlockingIOError:
                pass
            self.reap()
        elif data == "power":
            log("power button pressed: powering off")
            self.power_off = True
        else:
            session, out = data
            if out == "conn":
                session.on_event(mask)
            elif out is None:
                session.pump_stdin()
            elif out.fd == key.fd:
                session.on_readable(out)

    def read_port(self) -> None:
        # The port hands out at most one 4 KiB virtio buffer per read(): drain what is there in a
        # tight loop and decode once, instead of one trip round the event loop per 4 KiB.
        chunks: list[bytes] = []
        total = 0
        while total < PORT_READ:
            try:
                data = os.read(self.port_fd, PORT_READ)
            except BlockingIOError:
                break
            except OSError as exc:  # not expected of a virtio port; never fatal
                log(f"reading the port failed: {exc}")
                time.sleep(0.05)
                break
            if not data:
                if not chunks:  # no host connected: the port reads EOF until one is
                    if self.sessions:
                        attach.detach_all(self)  # processes go on; their output is kept
                    if self.decoder.buffered:  # the next host starts at a frame boundary
                        self.decoder = wire.FrameDecoder(skip_bad=True)
                    time.sleep(0.05)
                break
            chunks.append(data)
            total += len(data)
        if not chunks:
            return
        dropped = self.decoder.dropped
        messages = self.decoder.feed(b"".join(chunks))
        if self.decoder.dropped != dropped:
            count = self.decoder.dropped - dropped
            log(f"dropped {count} bad frame(s) from the host: {self.decoder.last_error}")
        for message in messages:
            self.on_message(message)

    def reap(self) -> None:
        if not self.init:  # embedded: only our own children, by polling
            for pid, session in list(self.by_pid.items()):
                if session.status is None:
                    try:
                        done, status = os.waitpid(pid, os.WNOHANG)
                    except ChildProcessError:  # reaped behind our back: its status is lost
                        done, status = pid, 0
                    if done:
                        session.on_reaped(status)
            return
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            reaped = self.by_pid.get(pid)
            if reaped is not None:
                reaped.on_reaped(status)

    # -- messages --

    def on_message(self, m: Message) -> None:
        try:
            self.route(m)
        except Exception as exc:
            log(f"dropped a {safe_text(m['t'][:20])!r} message: {exc!r:.300}")

    def route(self, m: Message) -> None:
        kind = m["t"]
        sid = fields.request_id(m.get("id"))
        if kind == "req":
            if sid is None:  # a reply to it would break the host's side of the protocol
                log("dropped a request without a valid id")
            else:
                self.on_request(sid, m)
            return
        session = self.sessions.get(sid) if sid is not None else None
        if session is None:
            return  # late traffic for a finished request
        stream = m.get("s")
        if kind == "cancel":
            session.cancel()
        elif not isinstance(stream, str):
            return
        elif kind == "data":
            data = m.get("d")
            if isinstance(data, bytes) and data:
                session.on_data(stream, data)
        elif kind == "eof":
            session.on_eof(stream)
        elif kind == "ack":
            n = m.get("n")
            if type(n) is int and 0 < n <= wire.WINDOW:
                session.on_ack(stream, n)

    def on_request(self, sid: int, m: Message) -> None:
        name = m.get("op")
        self.replied = 0
        try:
            if not isinstance(name, str):
                raise BadRequest(f"'op' must be a string, not {type(name).__name__}")
            op = self.ops.get(name)
            if op is None:
                raise BadRequest(f"unknown operation {safe_text(name[:80])!r}")
            if sid in self.sessions and name != "resync":  # a new host's ids start again
                raise BadRequest(f"request id {sid} is in use")
            op(sid, m)
        except Exception as exc:  # anything a request can cause is its error, never the agent's end
            if self.replied == sid:
                log(f"request {sid} failed after its reply: {exc!r:.300}")
            else:
                self.reply_error(sid, exc)

    def reply(self, sid: int, **body: Any) -> None:
        message = {"t": "res", "id": sid, "ok": True, **body}
        try:
            self.outbox.send(message)
        except UnicodeEncodeError:  # a name from the guest that is not UTF-8
            self.outbox.send(fields.safe_value(message))
        self.replied = sid

    def reply_error(self, sid: int, exc: BaseException) -> None:
        self.outbox.send({"t": "res", "id": sid, "ok": False, "err": error_body(exc)})
        self.replied = sid

    # -- operations --

    def op_ping(self, sid: int, m: Message) -> None:
        self.reply(sid)

    def op_info(self, sid: int, m: Message) -> None:
        uname = os.uname()
        memory = 0
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    memory = int(line.split()[1]) * 1024
                    break
        with open("/proc/mounts") as fh:
            mounts = [line.split()[:4] for line in fh if len(line.split()) >= 4]
        with open("/proc/uptime") as fh:
            uptime = float(fh.read().split()[0])
        self.reply(
            sid,
            kernel_version=uname.release,
            hostname=uname.nodename,
            cpus=os.cpu_count() or 1,
            memory_bytes=memory,
            mounts=mounts,
            agent_version=AGENT_VERSION,
            python_version=sys.version.split()[0],
            uptime=uptime,
            image=self.image.name if self.image is not None else None,
        )

    def op_refresh(self, sid: int, m: Message) -> None:
        """A restored or forked guest takes a new identity (see :func:`init.set_identity`). Every
        argument is checked before anything changes."""
        entropy, now, hostname = fields.entropy(m), fields.clock(m), fields.hostname(m)
        network = m.get("network")
        link = parse_link_identity(network) if network is not None else None
        if self.init:
            set_identity(entropy, now, hostname, link)
        self.reply(sid)

    def op_shutdown(self, sid: int, m: Message) -> None:
        self.reply(sid)
        self.power_off = True

    def shutdown_now(self) -> None:
        self.outbox.flush_blocking(2.0)
        power_off()


def main() -> None:
    os.chdir("/")
    try:
        path = find_port()
    except StartupError as exc:
        startup_failed(exc)
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    agent = Agent(fd, init=True)
    try:
        agent.image = enter_user_root()
    except (OSError, ValueError) as exc:
        startup_failed(exc)
    try:
        agent.run()  # as PID 1 it returns only by powering off
    except BaseException as exc:  # never reached in practice: a clean power-off beats the panic
        log(f"the agent's loop ended: {exc!r:.300}")  # of a dead PID 1
    power_off()


if __name__ == "__main__":
    main()
