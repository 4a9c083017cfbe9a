"""The command operations of the guest agent: start a command (pipes or a terminal, as an account,
with the image's defaults), resize its terminal, signal it. A started command's output and exit then
flow through its :class:`ExecSession`, which outlives the host that started it (``attach.py``).
The loop routes the operations in :data:`OPS` here (``main.Agent.ops``).
"""

from __future__ import annotations

import fcntl
import os
import struct
from collections.abc import Callable
from typing import Any, Protocol

from capsa.agent.guest import accounts, fields
from capsa.agent.guest.connections import ConnectSession
from capsa.agent.guest.sessions import BadRequest, ExecSession, Host, Message, Outbox, Session
from capsa.agent.guest.spawn import TIOCSWINSZ, spawn_pipes, spawn_pty
from capsa.agent.guest.userroot import ImageDefaults

DEFAULT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "TERM": "xterm-256color",
}


class Agent(Host, Protocol):
    """What the command operations need of the agent (:class:`capsa.agent.guest.main.Agent`)."""

    outbox: Outbox
    sessions: dict[int, Session | ConnectSession]
    by_pid: dict[int, ExecSession]
    image: ImageDefaults | None
    replied: int

    def reply(self, sid: int, **body: Any) -> None: ...

    def reap(self) -> None: ...


def op_exec(agent: Agent, sid: int, m: Message) -> None:
    argv = fields.argv(m)
    given = fields.environment(m)
    env = {**DEFAULT_ENV, **given}
    cwd = fields.working_directory(m)
    who = accounts.requested(m)
    if not m.get("cwd"):  # the image's WorkingDir, else the home of an account asked for
        if agent.image is not None and agent.image.cwd is not None:
            cwd = agent.image.cwd
        elif who is not None:
            cwd = accounts.home_directory(who) or cwd
    if agent.image is not None:
        env = {**DEFAULT_ENV, **agent.image.env, **given}
        if who is None and agent.image.user:
            who = accounts.resolve(agent.image.user)
    if who is not None:
        accounts.command_environment(who, env, given)
        who = None if who.is_root else who
    size = m.get("pty")
    if size is not None:
        rows, cols = fields.terminal_size(size)
        popen, fds = spawn_pty(argv, env, cwd, rows, cols, account=who)
    else:
        popen, fds = spawn_pipes(argv, env, cwd, fields.flag(m, "stdin"), account=who)
    for fd in fds.values():
        os.set_blocking(fd, False)
    session = ExecSession(agent, sid, popen, fds)
    session.pty_fd = fds["stdout"] if size is not None else None
    agent.sessions[sid] = session
    agent.by_pid[popen.pid] = session
    agent.reply(sid, pid=popen.pid)
    if size is not None:  # a terminal has one output stream: stderr ends at once
        agent.outbox.send({"t": "eof", "id": sid, "s": "stderr"})
    agent.reap()  # a child that exited at once would otherwise wait for the next SIGCHLD wakeup


def op_resize(agent: Agent, sid: int, m: Message) -> None:
    rows = fields.integer(m, "rows", 24, 1, fields.MAX_TERMINAL)
    cols = fields.integer(m, "cols", 80, 1, fields.MAX_TERMINAL)
    target = agent.sessions.get(fields.request_id(m.get("target")) or 0)
    if not isinstance(target, ExecSession) or target.pty_fd is None:
        raise BadRequest("resize needs a running command with a terminal")
    fcntl.ioctl(target.pty_fd, TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    agent.reply(sid)


def op_kill(agent: Agent, sid: int, m: Message) -> None:
    signum = fields.signal_number(m)
    target = agent.sessions.get(fields.request_id(m.get("target")) or 0)
    if not isinstance(target, ExecSession):
        err = {"kind": "unknown_target", "msg": "no such process", "errno": None, "path": None}
        agent.outbox.send({"t": "res", "id": sid, "ok": False, "err": err})
        agent.replied = sid
        return
    target.signal(signum)
    agent.reply(sid)


OPS: dict[str, Callable[[Agent, int, Message], None]] = {
    "exec": op_exec,
    "kill": op_kill,
    "resize": op_resize,
}
