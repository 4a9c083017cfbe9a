"""File details beyond ``stat``: owner and group names, and user metadata kept as extended
attributes.

E2B's file API shows each entry's owner and group by name and a ``metadata`` map that lives on the
file as ``user.e2b.*`` extended attributes (set by an upload, readable by anything in the guest).
Both need the guest: names come from its ``/etc/passwd`` and ``/etc/group``, attributes from its
filesystem. One ``details`` request covers a whole directory listing, so a listing costs one more
round trip, not one per entry.

The agent's main loop routes the operations in :data:`OPS` here (``main.Agent.ops``).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import Any, Protocol

from capsa.agent.guest import fields
from capsa.agent.guest.sessions import BadRequest, Message, safe_text

PREFIX = "user.e2b."  # the namespace E2B's envd keeps file metadata in
FALLBACK = "trusted.e2b."  # where a filesystem without user.* attributes keeps it
NAMESPACES = (PREFIX, FALLBACK)
MAX_PATHS = 5000  # paths in one details request (a listing is cut at 10 000 entries host-side)
MAX_KEYS = 64  # metadata keys per file
MAX_KEY = 200  # bytes per key (after the prefix; xattr names stop at 255)
MAX_VALUE = 4096  # bytes per value
REPLY_BUDGET = 512 << 10  # bytes of rows in one reply (a frame holds about 1 MiB)


class _Replier(Protocol):
    def reply(self, sid: int, **body: Any) -> None: ...


def _names(cache: dict[tuple[str, int], str], kind: str, ident: int) -> str:
    """The user or group name of ``ident`` (its number as text when it has none)."""
    key = (kind, ident)
    if key not in cache:
        import grp  # noqa: PLC0415 - only for file listings; keeps the agent's cold start short
        import pwd  # noqa: PLC0415

        try:
            name = pwd.getpwuid(ident).pw_name if kind == "u" else grp.getgrgid(ident).gr_name
        except (KeyError, OverflowError):
            name = str(ident)
        cache[key] = safe_text(name)
    return cache[key]


def _xattrs(path: str) -> list[str]:
    """The attribute names of ``path`` (not following a symlink); none where the filesystem
    keeps none."""
    try:
        return os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return []
        raise


def metadata(path: str) -> dict[str, str]:
    """The ``user.e2b.*`` (else ``trusted.e2b.*``) attributes of ``path``, prefix stripped."""
    found: dict[str, str] = {}
    for name in _xattrs(path):
        prefix = next((p for p in NAMESPACES if name.startswith(p)), None)
        key = None if prefix is None else safe_text(name[len(prefix) :])
        if key is None or key in found or len(found) >= MAX_KEYS:
            continue
        try:
            raw = os.getxattr(path, name, follow_symlinks=False)
        except OSError:
            continue  # removed meanwhile
        found[key] = raw[:MAX_VALUE].decode("utf-8", "replace")
    return found


def op_details(agent: _Replier, sid: int, m: Message) -> None:
    """``paths`` → ``rows``: per path ``[owner, group, metadata]``, or ``None`` if it is gone; as
    many rows as fit in one reply (at least one), in the order of ``paths``."""
    paths = m.get("paths")
    if not isinstance(paths, list) or len(paths) > MAX_PATHS:
        raise BadRequest(f"'paths' must be a list of at most {MAX_PATHS} paths")
    checked = [fields.text(p, "a path") for p in paths]
    cache: dict[tuple[str, int], str] = {}
    rows: list[Any] = []
    size = 0
    for path in checked:  # the first rows that fit in one reply; the host asks again for the rest
        try:
            st = os.lstat(path)
            owner, group = _names(cache, "u", st.st_uid), _names(cache, "g", st.st_gid)
            meta = metadata(path)
        except OSError:
            cost, row = 16, None
        else:
            cost = 16 + len(owner) + len(group) + sum(len(k) + len(v) for k, v in meta.items())
            row = [owner, group, meta]
        if rows and size + cost > REPLY_BUDGET:
            break
        rows.append(row)
        size += cost
    agent.reply(sid, rows=rows)


def op_set_metadata(agent: _Replier, sid: int, m: Message) -> None:
    """Replace ``path``'s ``user.e2b.*`` attributes with ``metadata`` (an empty map clears them,
    as an upload without metadata does in E2B)."""
    path = fields.path(m)
    wanted = m.get("metadata")
    if not isinstance(wanted, dict) or len(wanted) > MAX_KEYS:
        raise BadRequest(f"'metadata' must be a map of at most {MAX_KEYS} entries")
    for key, value in wanted.items():
        fields.text(key, "a metadata key", limit=MAX_KEY)
        fields.text(value, "a metadata value", empty=True, limit=MAX_VALUE)
    for name in _xattrs(path):
        if name.startswith(NAMESPACES):
            os.removexattr(path, name, follow_symlinks=False)
    for key, value in wanted.items():
        try:
            os.setxattr(path, PREFIX + key, value.encode(), follow_symlinks=False)
        except OSError as exc:
            if exc.errno != errno.ENOTSUP:
                raise
            # tmpfs before Linux 6.6 (the upper layer of capsa's root) keeps no user.*
            # attributes; the trusted namespace (root only) it does
            os.setxattr(path, FALLBACK + key, value.encode(), follow_symlinks=False)
    agent.reply(sid)


OPS: dict[str, Callable[[_Replier, int, Message], None]] = {
    "details": op_details,
    "set_metadata": op_set_metadata,
}
