"""The file operations of the guest agent: read, write, list, stat, test, make and remove paths.

Every path comes through :func:`fields.path`; files the guest may have planted (a FIFO,
``/proc/kmsg``) are opened without blocking, and only a regular file is read, truncated or written,
so no request can stop the agent's loop. The loop routes the operations in :data:`OPS` here
(``main.Agent.ops``); a transfer's bytes then flow through a :class:`ReadSession` or
:class:`WriteSession`.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from typing import Any, Protocol

import msgpack

from capsa.agent.guest import accounts, fields
from capsa.agent.guest.connections import ConnectSession
from capsa.agent.guest.sessions import Host, Message, ReadSession, Session, WriteSession, safe_text

_OPEN_FLAGS = os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY  # a FIFO or a tty must not block or adopt us


class Agent(Host, Protocol):
    """What the file operations need of the agent (:class:`capsa.agent.guest.main.Agent`)."""

    sessions: dict[int, Session | ConnectSession]

    def reply(self, sid: int, **body: Any) -> None: ...


def op_read_file(agent: Agent, sid: int, m: Message) -> None:
    path = fields.path(m)
    fd = os.open(path, os.O_RDONLY | _OPEN_FLAGS)
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
    except BaseException:
        os.close(fd)
        raise
    # The fd stays non-blocking: a "regular" file that blocks (/proc/kmsg) fails the read
    # instead of stopping the agent.
    agent.sessions[sid] = ReadSession(agent, sid, fd)
    agent.reply(sid, size=st.st_size)


def op_write_file(agent: Agent, sid: int, m: Message) -> None:
    path = fields.path(m)
    mode = fields.mode(m, 0o644)
    who = accounts.requested(m)  # the file's owner (it is written as root, then handed over)
    # Not O_TRUNC: only a regular file may be truncated. A FIFO without a reader fails (ENXIO)
    # instead of blocking the agent until one comes.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | _OPEN_FLAGS, mode)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        os.ftruncate(fd, 0)
        if who is not None and (st.st_uid, st.st_gid) != (who.uid, who.gid):
            os.fchown(fd, who.uid, who.gid)
        os.fchmod(fd, mode)  # after the chown, which clears set-id bits
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    agent.sessions[sid] = WriteSession(agent, sid, fd)
    agent.reply(sid)


def op_list_dir(agent: Agent, sid: int, m: Message) -> None:
    path = fields.path(m)
    entries = []
    with os.scandir(path) as it:
        for entry in it:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            name = safe_text(entry.name)
            entries.append([name, file_type(st.st_mode), st.st_size, st.st_mode & 0o7777, st.st_mtime])
    entries.sort()
    payload: bytes = msgpack.packb(entries, use_bin_type=True)
    agent.sessions[sid] = ReadSession(agent, sid, -1, payload)
    agent.reply(sid, size=len(payload))


def op_stat(agent: Agent, sid: int, m: Message) -> None:
    path = fields.path(m)
    follow = fields.flag(m, "follow", True)
    st = os.stat(path, follow_symlinks=follow)
    target = safe_text(os.readlink(path)) if stat.S_ISLNK(st.st_mode) else None
    agent.reply(
        sid,
        type=file_type(st.st_mode),
        size=st.st_size,
        mode=st.st_mode & 0o7777,
        uid=st.st_uid,
        gid=st.st_gid,
        mtime=st.st_mtime,
        target=target,
    )


def op_disk_usage(agent: Agent, sid: int, m: Message) -> None:
    """The filesystem holding ``path``: its size and free bytes (``statvfs``; no process spawned,
    which under TCG would translate a loader and a libc start for every sample)."""
    st = os.statvfs(fields.path(m))
    agent.reply(sid, total=st.f_frsize * st.f_blocks, free=st.f_frsize * st.f_bfree)


def op_exists(agent: Agent, sid: int, m: Message) -> None:
    agent.reply(sid, exists=os.path.exists(fields.path(m)))


def op_mkdir(agent: Agent, sid: int, m: Message) -> None:
    path = fields.path(m)
    mode = fields.mode(m, 0o755)
    who = accounts.requested(m)  # who owns the directories it creates
    if fields.flag(m, "parents"):
        if who is None:
            os.makedirs(path, mode, exist_ok=True)
        else:
            accounts.make_directories(path, mode, who)
    else:
        os.mkdir(path, mode)
        accounts.hand_over(path, who)
    agent.reply(sid)


def op_remove(agent: Agent, sid: int, m: Message) -> None:
    path = fields.path(m)
    recursive = fields.flag(m, "recursive")
    st = os.lstat(path)
    if stat.S_ISDIR(st.st_mode):
        if recursive:
            import shutil  # noqa: PLC0415 - rarely needed; keeps cold start short

            shutil.rmtree(path)
        else:
            os.rmdir(path)
    else:
        os.unlink(path)
    agent.reply(sid)


def file_type(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "other"


OPS: dict[str, Callable[[Agent, int, Message], None]] = {
    "read_file": op_read_file,
    "write_file": op_write_file,
    "list_dir": op_list_dir,
    "stat": op_stat,
    "disk_usage": op_disk_usage,
    "exists": op_exists,
    "mkdir": op_mkdir,
    "remove": op_remove,
}
