"""Host side of the guest's ``details`` and ``set_metadata`` operations (``guest/details.py``):
owner and group names and ``user.e2b.*`` metadata of guest files, as E2B's file API shows them."""

from __future__ import annotations

from dataclasses import dataclass

from capsa.agent.client import Agent
from capsa.agent.errors import check_guest_path, check_timeout, expect_ok
from capsa.errors import ProtocolError

DEFAULT_TIMEOUT = 30.0
BATCH = 2000  # paths per request (the guest answers as many as fit in one reply)


@dataclass(frozen=True)
class FileDetails:
    owner: str
    group: str
    metadata: dict[str, str]


def _row(value: object) -> FileDetails | None:
    if value is None:
        return None
    if not (
        isinstance(value, list)
        and len(value) == 3
        and isinstance(value[0], str)
        and isinstance(value[1], str)
        and isinstance(value[2], dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in value[2].items())
    ):
        raise ProtocolError("details: malformed row from the agent")
    return FileDetails(value[0], value[1], dict(value[2]))


async def file_details(
    agent: Agent, paths: list[str], *, timeout: float = DEFAULT_TIMEOUT
) -> list[FileDetails | None]:
    """Per path its details, or ``None`` where it no longer exists (not following symlinks)."""
    check_timeout(timeout)
    for path in paths:
        check_guest_path(path)
    found: list[FileDetails | None] = []
    while len(found) < len(paths):
        batch = paths[len(found) : len(found) + BATCH]
        reply = expect_ok(await agent.channel.request("details", {"paths": batch}, timeout), "details")
        rows = reply.get("rows")
        if not isinstance(rows, list) or not 1 <= len(rows) <= len(batch):
            raise ProtocolError("details: the agent's reply has a bad 'rows'")
        found.extend(_row(row) for row in rows)
    return found


async def set_metadata(
    agent: Agent, path: str, metadata: dict[str, str], *, timeout: float = DEFAULT_TIMEOUT
) -> None:
    """Replace the file's ``user.e2b.*`` attributes with ``metadata`` (``{}`` clears them)."""
    check_guest_path(path)
    check_timeout(timeout)
    args = {"path": path, "metadata": dict(metadata)}
    expect_ok(await agent.channel.request("set_metadata", args, timeout), "set_metadata", path)
