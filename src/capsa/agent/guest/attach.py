"""Processes that outlive their host: ``resync``, ``processes`` and ``attach``.

A spawned process belongs to the guest, not to the connection that started it. When the host goes
away (the port reads EOF) or a *new* host takes over (a guest restored from a snapshot, or a fork:
its first request is ``resync``), every exec session is detached: it keeps running, its output is
kept in the guest (see :class:`capsa.agent.guest.sessions.OutStream`: unacknowledged output plus up
to ``HOLD_LIMIT`` bytes per stream, then the process blocks on its pipe) and its exit status is kept
until a host attaches and collects it. ``attach`` binds such a session to a new request id.
"""

from __future__ import annotations

from typing import Any, Protocol

from capsa.agent.guest import fields
from capsa.agent.guest.connections import ConnectSession
from capsa.agent.guest.sessions import BadRequest, ExecSession, Message, Outbox, Session

SYNC_MAGIC = b"\x00\x00\x00\x00capsa-resync:"  # then the host's token; never the start of a frame
MAX_LISTED = 1000  # processes in one listing (a reply must fit in one frame)
MAX_REPLY = 900 << 10  # bytes of a listing: under wire.MAX_FRAME
MAX_FINISHED = 256  # detached, finished, uncollected sessions kept; the oldest go first


class Agent(Protocol):
    outbox: Outbox
    sessions: dict[int, Session | ConnectSession]
    by_pid: dict[int, ExecSession]
    replied: int

    def reply(self, sid: int, **body: Any) -> None: ...


def detach_all(agent: Agent) -> None:
    """The host is gone: keep every process, forget every other request (file transfers)."""
    for session in list(agent.sessions.values()):
        if isinstance(session, ExecSession):
            session.detach()
            del agent.sessions[session.id]
        else:
            session.cancel()
    agent.sessions.clear()
    finished = [s for s in agent.by_pid.values() if s.status is not None and not s.attached]
    for session in sorted(finished, key=lambda s: s.reaped_at)[: max(0, len(finished) - MAX_FINISHED)]:
        session.close_stdin()
        for out in session.outs.values():
            out.close()
        del agent.by_pid[session.pid]


def op_resync(agent: Agent, sid: int, m: Message) -> None:
    """A new host (after a restore): detach everything, drop frames queued for the old host, then
    send the marker the new host skips to (anything before it is the old conversation)."""
    token = m.get("token")
    if not isinstance(token, bytes) or not 16 <= len(token) <= 64:
        raise BadRequest("'token' must be 16 to 64 bytes")
    detach_all(agent)
    agent.outbox.clear()
    agent.outbox.send_raw(SYNC_MAGIC + token)
    agent.reply(sid)


def op_processes(agent: Agent, sid: int, m: Message) -> None:
    """Up to MAX_LISTED processes, as many as fit in one frame (a word is at most 256 characters,
    1 KiB of UTF-8): the oldest first."""
    rows, size = [], 0
    for session in list(agent.by_pid.values())[:MAX_LISTED]:
        row = session.describe()
        size += 256 + 4 * sum(len(word) + 1 for word in row["argv"])
        if size > MAX_REPLY:
            break
        rows.append(row)
    agent.reply(sid, processes=rows)


def op_attach(agent: Agent, sid: int, m: Message) -> None:
    pid = fields.integer(m, "pid", 0, 1, 1 << 22)
    session = agent.by_pid.get(pid)
    if session is None:
        err = {"kind": "unknown_target", "msg": "no such process", "errno": None, "path": None}
        agent.outbox.send({"t": "res", "id": sid, "ok": False, "err": err})
        agent.replied = sid
        return
    if session.attached:
        raise BadRequest(f"process {pid} is attached to request {session.id} of this connection")
    session.attach(sid)
    agent.sessions[sid] = session
    info = session.describe()
    agent.reply(sid, pid=pid, argv=info["argv"], pty=info["pty"], stdin=session.stdin_fd is not None)
    session.deliver()
