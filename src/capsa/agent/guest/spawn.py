"""How the guest agent starts commands: on pipes, or on a new pseudo-terminal."""

from __future__ import annotations

import fcntl
import os
import struct
import subprocess
from typing import Any

from capsa.agent.guest.accounts import Account

TIOCSWINSZ = 0x5414
TIOCSCTTY = 0x540E


def _credentials(account: Account | None) -> dict[str, Any]:
    """Popen's arguments to run as ``account`` (setgroups, setgid, setuid in the child, before the
    exec); none: as the agent."""
    if account is None:
        return {}
    return {"user": account.uid, "group": account.gid, "extra_groups": list(account.groups)}


def spawn_pipes(
    argv: list[str],
    env: dict[str, str],
    cwd: str,
    with_stdin: bool,
    *,
    account: Account | None = None,
) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
    parent: list[int] = []
    child: list[int] = []
    try:
        pipes = {}
        for name in ("stdout", "stderr"):
            r, w = os.pipe2(os.O_CLOEXEC)
            parent.append(r)
            child.append(w)
            pipes[name] = (r, w)
        stdin: int = subprocess.DEVNULL
        if with_stdin:
            r, w = os.pipe2(os.O_CLOEXEC)
            parent.append(w)
            child.append(r)
            pipes["stdin"] = (w, r)
            stdin = r
        popen = subprocess.Popen(
            argv,
            stdin=stdin,
            stdout=pipes["stdout"][1],
            stderr=pipes["stderr"][1],
            cwd=cwd,
            env=env,
            start_new_session=True,
            **_credentials(account),
        )
    except BaseException:
        for fd in parent:
            os.close(fd)
        raise
    finally:
        for fd in child:
            os.close(fd)
    return popen, {name: ends[0] for name, ends in pipes.items()}


def _take_terminal() -> None:
    """In the child, after setsid: make the pty its controlling terminal (job control, Ctrl-C)."""
    fcntl.ioctl(0, TIOCSCTTY, 0)


def spawn_pty(
    argv: list[str],
    env: dict[str, str],
    cwd: str,
    rows: int,
    cols: int,
    *,
    account: Account | None = None,
) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
    """The command on a new pseudo-terminal: its stdin, stdout and stderr are the terminal."""
    master, slave = os.openpty()
    try:
        fcntl.ioctl(slave, TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        if account is not None:  # the terminal is its user's, as login(1) leaves it
            os.fchown(slave, account.uid, -1)
        popen = subprocess.Popen(
            argv,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            cwd=cwd,
            env=env,
            start_new_session=True,
            preexec_fn=_take_terminal,  # noqa: PLW1509 - runs in the child before exec, by design
            **_credentials(account),
        )
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(slave)
    return popen, {"stdout": master, "stdin": os.dup(master)}
