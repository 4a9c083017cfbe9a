"""capsa's guest agent. Copied into the sandbox image and run by the guest's ``python3`` as PID 1.

It is one single-threaded ``selectors`` loop, not asyncio: under TCG every line of Python that runs
for the first time is translated by QEMU, and importing asyncio would add a visible share to each cold
start. Being PID 1 it also reaps every orphan in the guest (``waitpid(-1)`` on ``SIGCHLD``).

The protocol is documented in :mod:`capsa.agent.wire`. This side trusts the host (the host owns the
VM) but still answers a malformed request with a ``bad_request`` error instead of dying, because a
dead PID 1 takes the whole guest down.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import selectors
import signal
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any, NoReturn

import msgpack

from capsa.agent import wire
from capsa.agent.guest.link import take_link_identity
from capsa.agent.guest.sessions import (
    OUTBOX_HIGH,
    BadRequest,
    ExecSession,
    Message,
    Outbox,
    ReadSession,
    Session,
    WriteSession,
    error_body,
    log,
)
from capsa.agent.guest.spawn import TIOCSWINSZ, spawn_pipes, spawn_pty

AGENT_VERSION = "1"
PORT_NAME = "capsa.agent"
PORT_WAIT_SECONDS = 10.0
PORT_READ = 2 << 20
DEFAULT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "TERM": "xterm-256color",
}
_LINUX_REBOOT_CMD_POWER_OFF = 0x4321FEDC
_RNDADDENTROPY = 0x40085203  # _IOW('R', 0x03, int[2])
_RNDRESEEDCRNG = 0x5207  # _IO('R', 0x07)
INIT_ERROR_MARKER = "CAPSA-INIT-ERROR"  # same as capsa.image.sandbox's (the host looks for it)


def _str(m: Message, key: str) -> str:
    value = m.get(key)
    if not isinstance(value, str) or not value or "\0" in value:
        raise BadRequest(f"{key!r} must be a non-empty string")
    return value


def _int(m: Message, key: str, default: int) -> int:
    value = m.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadRequest(f"{key!r} must be an integer")
    return value


# -- the port ------------------------------------------------------------------------------------


def find_port(name: str = PORT_NAME, wait: float = PORT_WAIT_SECONDS) -> str:
    deadline = time.monotonic() + wait
    while True:
        try:
            entries = os.listdir("/sys/class/virtio-ports")
        except OSError:
            entries = []
        for entry in entries:
            try:
                with open(f"/sys/class/virtio-ports/{entry}/name") as fh:
                    if fh.read().strip() == name:
                        return f"/dev/{entry}"
            except OSError:
                continue
        if time.monotonic() > deadline:
            raise StartupError(f"no virtio-serial port named {name} (virtio_console driver missing?)")
        time.sleep(0.01)


class StartupError(Exception):
    """The agent cannot serve; reported on the console like the init's own errors."""


# -- the agent -------------------------------------------------------------------------------------


class Agent:
    def __init__(self, port_fd: int) -> None:
        self.outbox = Outbox(port_fd)
        self.port_fd = port_fd
        self.decoder = wire.FrameDecoder()
        self.sel = selectors.DefaultSelector()
        self.sessions: dict[int, Session] = {}
        self.by_pid: dict[int, ExecSession] = {}
        self.interest: dict[int, tuple[int, Any]] = {}
        self.power_off = False
        self.ops: dict[str, Callable[[int, Message], None]] = {
            "ping": self.op_ping,
            "info": self.op_info,
            "exec": self.op_exec,
            "kill": self.op_kill,
            "read_file": self.op_read_file,
            "write_file": self.op_write_file,
            "list_dir": self.op_list_dir,
            "stat": self.op_stat,
            "exists": self.op_exists,
            "mkdir": self.op_mkdir,
            "remove": self.op_remove,
            "shutdown": self.op_shutdown,
            "refresh": self.op_refresh,
            "resize": self.op_resize,
        }
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.wake_fd = wake_r
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        # PID 1 ignores signals it has no handler for; a no-op handler (reset by exec in children)
        # keeps a guest "kill -INT 1" from raising KeyboardInterrupt in the agent.
        signal.signal(signal.SIGINT, lambda *_: None)
        self.sel.register(wake_r, selectors.EVENT_READ, "wake")
        self.sel.register(port_fd, selectors.EVENT_READ, "port")
        self.interest[port_fd] = (selectors.EVENT_READ, "port")
        self.power_fds = self._open_power_button()

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

    def forget(self, session: Session) -> None:
        self.sessions.pop(session.id, None)
        if isinstance(session, ExecSession):
            self.by_pid.pop(session.pid, None)

    def _open_power_button(self) -> list[int]:
        fds: list[int] = []
        try:
            names = os.listdir("/sys/class/input")
        except OSError:
            return fds
        for name in names:
            if not name.startswith("event"):
                continue
            try:
                with open(f"/sys/class/input/{name}/device/name") as fh:
                    if fh.read().strip() != "Power Button":
                        continue
                fd = os.open(f"/dev/input/{name}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                continue
            self.sel.register(fd, selectors.EVENT_READ, "power")
            fds.append(fd)
        return fds

    # -- main loop --

    def run(self) -> None:
        self.outbox.send({"t": "hello", "v": wire.PROTOCOL_VERSION, "pid": os.getpid()})
        while not self.power_off:
            producing = self.update_interest()
            timeout: float | None = 0 if producing else None
            if any(isinstance(s, ExecSession) and s.status is not None for s in self.sessions.values()):
                timeout = 0.1 if timeout is None else timeout
            for key, mask in self.sel.select(timeout):
                self.dispatch(key, mask)
            now = time.monotonic()
            for session in list(self.sessions.values()):
                if isinstance(session, ExecSession):
                    session.check_grace(now)
            self.outbox.flush()
        self.shutdown_now()

    def update_interest(self) -> bool:
        room = self.outbox.size < OUTBOX_HIGH
        producing = False
        for session in list(self.sessions.values()):
            if isinstance(session, ReadSession):
                while session.id in self.sessions and session.ready():
                    session.produce()
                producing = producing or (session.id in self.sessions and session.ready())
            elif isinstance(session, ExecSession):
                for out in session.outs.values():
                    if out.fd is not None:
                        wanted = selectors.EVENT_READ if room and out.can_read() else 0
                        self.want(out.fd, wanted, (session, out))
                if session.stdin_fd is not None:
                    wanted = selectors.EVENT_WRITE if session.stdin_pending else 0
                    self.want(session.stdin_fd, wanted, (session, None))
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
            if out is None:
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
            if not data:
                if not chunks:  # no host connected: the port reads EOF until one is
                    time.sleep(0.05)
                break
            chunks.append(data)
            total += len(data)
        if not chunks:
            return
        try:
            messages = self.decoder.feed(b"".join(chunks))
        except wire.WireError as exc:
            log(f"host sent a bad frame ({exc}); resetting the decoder")
            self.decoder = wire.FrameDecoder()
            return
        for message in messages:
            self.on_message(message)

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            session = self.by_pid.get(pid)
            if session is not None:
                session.on_reaped(status)

    # -- messages --

    def on_message(self, m: Message) -> None:
        kind = m["t"]
        sid = m.get("id")
        if kind == "req" and isinstance(sid, int):
            self.on_request(sid, m)
            return
        session = self.sessions.get(sid) if isinstance(sid, int) else None
        if session is None:
            return  # late traffic for a finished request
        stream = m.get("s")
        if kind == "data" and isinstance(m.get("d"), bytes) and isinstance(stream, str):
            session.on_data(stream, m["d"])
        elif kind == "eof" and isinstance(stream, str):
            session.on_eof(stream)
        elif kind == "ack" and isinstance(stream, str) and isinstance(m.get("n"), int):
            session.on_ack(stream, m["n"])
        elif kind == "cancel":
            session.cancel()

    def on_request(self, sid: int, m: Message) -> None:
        op = self.ops.get(m.get("op"))  # type: ignore[arg-type]
        try:
            if op is None:
                raise BadRequest(f"unknown operation {m.get('op')!r}")
            op(sid, m)
        except (OSError, BadRequest, ValueError, TypeError, subprocess.SubprocessError) as exc:
            self.reply_error(sid, exc)

    def reply(self, sid: int, **body: Any) -> None:
        self.outbox.send({"t": "res", "id": sid, "ok": True, **body})

    def reply_error(self, sid: int, exc: BaseException) -> None:
        self.outbox.send({"t": "res", "id": sid, "ok": False, "err": error_body(exc)})

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
        )

    def op_exec(self, sid: int, m: Message) -> None:
        argv = m.get("argv")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise BadRequest("'argv' must be a non-empty list of strings")
        env = dict(DEFAULT_ENV)
        user_env = m.get("env") or {}
        if not isinstance(user_env, dict):
            raise BadRequest("'env' must be a map")
        env.update({str(k): str(v) for k, v in user_env.items()})
        cwd = m.get("cwd") or "/"
        if not isinstance(cwd, str):
            raise BadRequest("'cwd' must be a string")
        size = m.get("pty")
        if size is not None:
            if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) for v in size)):
                raise BadRequest("'pty' must be [rows, cols]")
            popen, fds = spawn_pty(argv, env, cwd, size[0], size[1])
        else:
            popen, fds = spawn_pipes(argv, env, cwd, bool(m.get("stdin")))
        for fd in fds.values():
            os.set_blocking(fd, False)
        session = ExecSession(self, sid, popen, fds)
        session.pty_fd = fds["stdout"] if size is not None else None
        self.sessions[sid] = session
        self.by_pid[popen.pid] = session
        self.reply(sid, pid=popen.pid)
        if size is not None:  # a terminal has one output stream: stderr ends at once
            self.outbox.send({"t": "eof", "id": sid, "s": "stderr"})
        self.reap()  # a child that exited at once would otherwise wait for the next SIGCHLD wakeup

    def op_resize(self, sid: int, m: Message) -> None:
        target = self.sessions.get(_int(m, "target", 0))
        if not isinstance(target, ExecSession) or target.pty_fd is None:
            raise BadRequest("resize needs a running command with a terminal")
        rows, cols = _int(m, "rows", 24), _int(m, "cols", 80)
        fcntl.ioctl(target.pty_fd, TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.reply(sid)

    def op_kill(self, sid: int, m: Message) -> None:
        target = self.sessions.get(_int(m, "target", 0))
        signum = _int(m, "signal", signal.SIGKILL)
        if not isinstance(target, ExecSession):
            self.outbox.send(
                {
                    "t": "res",
                    "id": sid,
                    "ok": False,
                    "err": {
                        "kind": "unknown_target",
                        "msg": "no such process",
                        "errno": None,
                        "path": None,
                    },
                }
            )
            return
        target.signal(signum)
        self.reply(sid)

    def op_read_file(self, sid: int, m: Message) -> None:
        path = _str(m, "path")
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, "not a regular file", path)
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        self.sessions[sid] = ReadSession(self, sid, fd)
        self.reply(sid, size=st.st_size)

    def op_write_file(self, sid: int, m: Message) -> None:
        path = _str(m, "path")
        mode = _int(m, "mode", 0o644) & 0o7777
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
        try:
            os.fchmod(fd, mode)
        except OSError:
            os.close(fd)
            raise
        self.sessions[sid] = WriteSession(self, sid, fd)
        self.reply(sid)

    def op_list_dir(self, sid: int, m: Message) -> None:
        path = _str(m, "path")
        entries = []
        with os.scandir(path) as it:
            for entry in it:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                entries.append(
                    [entry.name, file_type(st.st_mode), st.st_size, st.st_mode & 0o7777, st.st_mtime]
                )
        entries.sort()
        payload: bytes = msgpack.packb(entries, use_bin_type=True)
        self.sessions[sid] = ReadSession(self, sid, -1, payload)
        self.reply(sid, size=len(payload))

    def op_stat(self, sid: int, m: Message) -> None:
        path = _str(m, "path")
        follow = bool(m.get("follow", True))
        st = os.stat(path, follow_symlinks=follow)
        target = os.readlink(path) if stat.S_ISLNK(st.st_mode) else None
        self.reply(
            sid,
            type=file_type(st.st_mode),
            size=st.st_size,
            mode=st.st_mode & 0o7777,
            uid=st.st_uid,
            gid=st.st_gid,
            mtime=st.st_mtime,
            target=target,
        )

    def op_exists(self, sid: int, m: Message) -> None:
        self.reply(sid, exists=os.path.exists(_str(m, "path")))

    def op_mkdir(self, sid: int, m: Message) -> None:
        path = _str(m, "path")
        mode = _int(m, "mode", 0o755) & 0o7777
        if m.get("parents"):
            os.makedirs(path, mode, exist_ok=True)
        else:
            os.mkdir(path, mode)
        self.reply(sid)

    def op_remove(self, sid: int, m: Message) -> None:
        path = _str(m, "path")
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            if m.get("recursive"):
                import shutil  # noqa: PLC0415 - rarely needed; keeps cold start short

                shutil.rmtree(path)
            else:
                os.rmdir(path)
        else:
            os.unlink(path)
        self.reply(sid)

    def op_refresh(self, sid: int, m: Message) -> None:
        """A restored or forked guest takes a new identity: fresh entropy (the RNG state came from
        the snapshot, shared by every clone), the host's clock, its own hostname, and with a network
        its own MAC and address."""
        entropy = m.get("entropy")
        hostname = _str(m, "hostname")
        now = m.get("time")
        if not isinstance(entropy, bytes) or len(entropy) < 32 or not isinstance(now, (int, float)):
            raise BadRequest("refresh needs 'entropy' (>= 32 bytes) and 'time'")
        with open("/dev/urandom", "wb") as fh:
            fcntl.ioctl(fh, _RNDADDENTROPY, struct.pack("ii", len(entropy) * 8, len(entropy)) + entropy)
            fcntl.ioctl(fh, _RNDRESEEDCRNG)
        time.clock_settime(time.CLOCK_REALTIME, float(now))
        with open("/proc/sys/kernel/hostname", "w") as fh:
            fh.write(hostname)
        with open("/etc/hostname", "w") as fh:
            fh.write(hostname + "\n")
        network = m.get("network")
        if network is not None:
            take_link_identity(network)
        self.reply(sid)

    def op_shutdown(self, sid: int, m: Message) -> None:
        self.reply(sid)
        self.power_off = True

    def shutdown_now(self) -> None:
        self.outbox.flush_blocking(2.0)
        power_off()


def file_type(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "other"


def power_off() -> NoReturn:
    with contextlib.suppress(OSError):
        os.kill(-1, signal.SIGKILL)  # every process but PID 1
    os.sync()
    import ctypes  # noqa: PLC0415 - only needed once, at power-off

    libc = ctypes.CDLL(None, use_errno=True)
    libc.reboot(_LINUX_REBOOT_CMD_POWER_OFF)
    log(f"reboot(POWER_OFF) failed: {os.strerror(ctypes.get_errno())}")
    os._exit(1)


def main() -> None:
    os.chdir("/")
    try:
        path = find_port()
    except StartupError as exc:
        sys.stderr.write(f"{INIT_ERROR_MARKER}: {exc}\n")
        sys.stderr.flush()
        power_off()
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    Agent(fd).run()


if __name__ == "__main__":
    main()
