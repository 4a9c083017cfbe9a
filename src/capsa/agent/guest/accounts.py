"""The account a request runs as: ``user`` on ``exec`` (commands and terminals), ``write_file`` and
``mkdir`` (who owns what they create).

The host sends only a name (or a uid, Docker's forms); the guest resolves it from its own
``/etc/passwd`` and ``/etc/group`` (:func:`userroot.resolve_user`), read directly because a user
image may have no NSS libraries. A command then runs as ``initgroups`` + ``setgid`` + ``setuid`` would
make it (the account's gid plus every group that lists it as a member), with ``HOME``, ``USER`` and
``LOGNAME`` of the account. File operations stay the agent's (root's), as E2B's envd does them, and
hand what they create to the account: a write is never refused for permissions, and the result is
what the account would own had it written the file itself.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from capsa.agent.guest import fields
from capsa.agent.guest.sessions import BadRequest, Message
from capsa.agent.guest.userroot import resolve_user

MAX_SPEC = 256
MAX_GROUPS = 64  # supplementary groups kept (NGROUPS_MAX is 65536; no account needs that many)


class UnknownUser(BadRequest):
    """The request names an account the guest does not have (its own error kind: the host raises
    ``UnknownUserError``, the server answers as envd does for an invalid username)."""

    kind = "unknown_user"


@dataclass(frozen=True)
class Account:
    uid: int
    gid: int
    groups: tuple[int, ...]  # supplementary groups, the gid first
    name: str | None  # None: a bare uid with no /etc/passwd entry
    home: str | None

    @property
    def is_root(self) -> bool:
        return self.uid == 0 and self.gid == 0 and self.groups in ((), (0,))


def member_groups(name: str, gid: int, root: str = "") -> tuple[int, ...]:
    """``gid`` and every group of ``root``/etc/group that lists ``name`` as a member (what
    ``initgroups(3)`` sets), at most :data:`MAX_GROUPS`."""
    found = [gid]
    try:
        with open(root + "/etc/group", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                entry = line.rstrip("\n").split(":")
                if len(entry) < 4 or not entry[2].isdigit() or name not in entry[3].split(","):
                    continue
                group = int(entry[2])
                if group < 1 << 32 and group not in found and len(found) < MAX_GROUPS:
                    found.append(group)
    except OSError:
        pass
    return tuple(found)


def resolve(spec: str, root: str = "") -> Account:
    """The account ``spec`` names ("name", "uid", "name:group" or "uid:gid"); :class:`UnknownUser`
    when the guest has no such account or group."""
    try:
        who = resolve_user(spec, root)
    except ValueError as exc:
        raise UnknownUser(str(exc)) from None
    user = spec.partition(":")[0]
    name = None
    if not user.isdigit():
        name = user
    elif who.home is not None:  # a uid with an entry: its name, for USER and the groups
        name = _name_of(who.uid, root)
    groups = member_groups(name, who.gid, root) if name is not None else (who.gid,)
    return Account(who.uid, who.gid, groups, name, who.home)


def _name_of(uid: int, root: str) -> str | None:
    try:
        with open(root + "/etc/passwd", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                entry = line.split(":")
                if len(entry) >= 6 and entry[2] == str(uid) and entry[0]:
                    return entry[0]
    except OSError:
        pass
    return None


def requested(m: Message) -> Account | None:
    """The request's ``user`` resolved, or None when it names none."""
    value = m.get("user")
    if value is None:
        return None
    return resolve(fields.text(value, "'user'", limit=MAX_SPEC))


def command_environment(who: Account, env: dict[str, str], given: dict[str, str]) -> None:
    """``HOME``, ``USER`` and ``LOGNAME`` of ``who`` into ``env``, unless the request gave them."""
    values = {"HOME": who.home, "USER": who.name, "LOGNAME": who.name}
    for key, value in values.items():
        if value and key not in given:
            env[key] = value


def home_directory(who: Account) -> str | None:
    """Where a command of ``who`` starts when the request names no directory: its home, if the
    guest has it (an image's account may name a home that was never created)."""
    return who.home if who.home and os.path.isdir(who.home) else None


def hand_over(path: str, who: Account | None) -> None:
    """Give ``path`` (just created by the agent) to ``who``; not following a final symlink."""
    if who is not None and not who.is_root:
        os.chown(path, who.uid, who.gid, follow_symlinks=False)


def make_directories(path: str, mode: int, who: Account | None) -> None:
    """``mkdir -p``: each missing component is created and handed to ``who`` (an existing one is
    left as it is, as envd does)."""
    missing = []
    head = os.path.normpath(path)
    while not os.path.lexists(head):
        missing.append(head)
        parent = os.path.dirname(head)
        if parent == head:
            break
        head = parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, mode)
        except FileExistsError:
            if not os.path.isdir(directory):
                raise
            continue  # made meanwhile by someone else: theirs
        hand_over(directory, who)
    if not os.path.isdir(path):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), path)
