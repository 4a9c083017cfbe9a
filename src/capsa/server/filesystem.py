"""envd's ``filesystem.Filesystem`` service and the ``/files`` transfers for one sandbox, mapped onto
capsa's guest agent.

Entries carry what E2B's envd shows: type, size, mode and permissions, modification time, the
symlink target, the owner and group by name, and the file's ``metadata`` (``user.e2b.*`` extended
attributes: set by an upload's ``X-Metadata-*`` headers, replaced by the next upload, kept by a
rename). Owner, group and metadata come from the guest's ``details`` operation, one round trip per
listing (``capsa.agent.details``).
"""

from __future__ import annotations

import datetime
import posixpath
import re
from collections.abc import AsyncGenerator, AsyncIterable, Mapping
from typing import Any

import capsa
from capsa.agent import streams
from capsa.agent.client import Agent
from capsa.agent.details import file_details, set_metadata
from capsa.errors import GuestFileNotFoundError
from capsa.server import accounts
from capsa.server.connect import ConnectError
from capsa.server.envd import map_error, resolve_guest_path
from capsa.server.limits import RequestRejected

MAX_LIST_DEPTH = 32  # ListDir levels (each one a guest round trip per directory)
MAX_LIST_ENTRIES = 100_000  # entries of one ListDir reply
METADATA_HEADER = "x-metadata-"  # the SDK sends each metadata key as X-Metadata-<key>
MAX_METADATA_KEYS = 64  # as the guest's limit (guest/details.py)
_METADATA_KEY = re.compile(r"[A-Za-z0-9!#$%&'*+\-.^_`|~]{1,200}\Z")  # an HTTP token
_METADATA_VALUE = re.compile(r"[\x20-\x7e]{0,4096}\Z")  # printable US-ASCII

_TYPES = {"file": "FILE_TYPE_FILE", "dir": "FILE_TYPE_DIRECTORY", "symlink": "FILE_TYPE_SYMLINK"}


def _permissions(kind: str, mode: int) -> str:
    prefix = {"dir": "d", "symlink": "l"}.get(kind, "-")
    bits = "".join(c if mode & (1 << (8 - i)) else "-" for i, c in enumerate("rwxrwxrwx"))
    return prefix + bits


def _time(seconds: float) -> str:
    stamp = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def entry_info(path: str, kind: str, size: int, mode: int, mtime: float) -> dict[str, Any]:
    info: dict[str, Any] = {
        "name": path.rstrip("/").rsplit("/", 1)[-1] or "/",
        "type": _TYPES.get(kind, "FILE_TYPE_UNSPECIFIED"),
        "path": path,
        "size": str(size),
        "mode": mode & 0o7777,
        "permissions": _permissions(kind, mode),
        "owner": "root",
        "group": "root",
        "modifiedTime": _time(mtime),
    }
    return info


def upload_metadata(headers: Mapping[str, str]) -> dict[str, str]:
    """The metadata an upload carries as ``X-Metadata-<key>`` headers (keys lowercased, as envd
    does); a malformed key or value is a 400."""
    found: dict[str, str] = {}
    for name, value in headers.items():
        if not name.lower().startswith(METADATA_HEADER):
            continue
        key = name[len(METADATA_HEADER) :].lower()
        if not _METADATA_KEY.match(key) or not _METADATA_VALUE.match(value):
            raise RequestRejected(400, f"invalid metadata header {name[:80]!r}")
        found[key] = value
    if len(found) > MAX_METADATA_KEYS:
        raise RequestRejected(400, f"more than {MAX_METADATA_KEYS} metadata keys")
    return found


class Filesystem:
    """``filesystem.Filesystem`` for one sandbox, acting for the account ``user`` names (None:
    envd's default; :mod:`capsa.server.accounts`): relative paths start in its home, and what a
    write, ``MakeDir`` or a ``Move``'s new parents create is handed to it."""

    def __init__(self, vm: capsa.Sandbox, user: str | None = None) -> None:
        self._agent = vm.agent
        self._vm = vm
        self._user = user
        self.home = accounts.home_of(user)

    def path(self, value: object) -> str:
        """A request's path, relative ones resolved in the account's home."""
        return resolve_guest_path(value, self.home)

    async def _mkdirs(self, path: str) -> None:
        async def mkdir(account: str | None) -> None:
            await self._agent.mkdir(path, parents=True, user=account)

        await accounts.as_account(self._user, mkdir)

    async def stat(self, path: str) -> dict[str, Any]:
        try:
            st = await self._agent.stat(path, follow_symlinks=False)
        except Exception as exc:
            raise map_error(exc, path) from None
        info = entry_info(path, st.type, st.size, st.mode, st.mtime)
        if st.target is not None:  # as envd: the target's type and times, and its absolute path
            absolute = posixpath.join(posixpath.dirname(path), st.target)
            info["symlinkTarget"], info["isSymlink"] = posixpath.normpath(absolute), True
            try:
                target = await self._agent.stat(path, follow_symlinks=True)
            except GuestFileNotFoundError:
                pass  # a dangling link stays a symlink
            except Exception as exc:
                raise map_error(exc, path) from None
            else:
                followed = entry_info(path, target.type, target.size, target.mode, target.mtime)
                info.update({k: v for k, v in followed.items() if k not in ("name", "path")})
        await self._add_details([info])
        return info

    async def _add_details(self, entries: list[dict[str, Any]]) -> None:
        """Fill in owner, group and metadata (a ``--ray`` sandbox's agent proxy has no such
        operation: its entries keep the defaults)."""
        agent = self._local_agent()
        if agent is None or not entries:
            return
        try:
            rows = await file_details(agent, [entry["path"] for entry in entries])
        except Exception as exc:
            raise map_error(exc) from None
        for entry, row in zip(entries, rows, strict=True):
            if row is not None:
                entry["owner"], entry["group"] = row.owner, row.group
                if row.metadata:
                    entry["metadata"] = row.metadata

    async def call(self, method: str, request: dict[str, Any]) -> dict[str, Any]:
        if method == "Stat":
            return {"entry": await self.stat(self.path(request.get("path")))}
        if method == "MakeDir":
            path = self.path(request.get("path"))
            if await self._agent.exists(path):
                raise ConnectError("already_exists", f"directory already exists: {path}")
            try:
                await self._mkdirs(path)
            except Exception as exc:
                raise map_error(exc, path) from None
            return {"entry": await self.stat(path)}
        if method == "Remove":
            path = self.path(request.get("path"))
            try:
                await self._agent.remove(path, recursive=True)
            except GuestFileNotFoundError:
                pass  # as envd: removing what is not there succeeds
            except Exception as exc:
                raise map_error(exc, path) from None
            return {}
        if method == "Move":
            return {"entry": await self._move(request)}
        if method == "ListDir":
            path = self.path(request.get("path"))
            depth = request.get("depth") or 1
            if not isinstance(depth, int) or not 1 <= depth <= MAX_LIST_DEPTH:
                raise ConnectError("invalid_argument", f"depth must be from 1 to {MAX_LIST_DEPTH}")
            entries = await self._list(path, depth)
            await self._add_details(entries)
            return {"entries": entries}
        raise ConnectError("unimplemented", f"filesystem.Filesystem/{method} is not implemented")

    async def _list(self, top: str, depth: int) -> list[dict[str, Any]]:
        """The entries under ``top`` down to ``depth`` levels, walked without recursion (a deep tree
        must not exhaust the server's stack) and at most :data:`MAX_LIST_ENTRIES` of them."""
        entries: list[dict[str, Any]] = []
        pending = [(top, depth)]
        while pending:
            path, levels = pending.pop()
            try:
                rows = await self._agent.list_dir(path)
            except Exception as exc:
                raise map_error(exc, path) from None
            children = []
            for row in rows:
                child = f"{path.rstrip('/')}/{row.name}"
                entries.append(entry_info(child, row.type, row.size, row.mode, row.mtime))
                if row.type == "dir" and levels > 1:
                    children.append((child, levels - 1))
            if len(entries) > MAX_LIST_ENTRIES:
                raise ConnectError(
                    "resource_exhausted", f"more than {MAX_LIST_ENTRIES} entries; list a smaller tree"
                )
            pending.extend(reversed(children))
        # envd walks the tree in lexical pre-order: each directory right before its contents
        entries.sort(key=lambda entry: entry["path"].split("/"))
        return entries

    async def _move(self, request: dict[str, Any]) -> dict[str, Any]:
        source = self.path(request.get("source"))
        destination = self.path(request.get("destination"))
        if not await self._agent.exists(source):
            raise ConnectError("not_found", f"path not found: {source}")
        try:  # as envd: the destination's missing parents are the account's; what moves keeps its owner
            await self._mkdirs(posixpath.dirname(destination))
        except Exception as exc:
            raise map_error(exc, destination) from None
        result = await self._agent.exec("mv").args(["-T", "--", source, destination]).timeout(60).run()
        if not result.ok:
            raise ConnectError("internal", f"rename failed: {result.stderr.strip()[:500]}")
        return await self.stat(destination)

    def _local_agent(self) -> Agent | None:
        """The agent when it runs in this process (the chunked transfers need its channel; a
        ``--ray`` sandbox's agent is a proxy that moves whole files)."""
        return self._agent if isinstance(self._agent, Agent) else None

    async def read_chunks(self, path: str, limit: int) -> AsyncGenerator[bytes, None]:
        """The file's content as it streams from the guest (at most ``limit`` bytes through a Ray
        proxy, which reads whole files). Errors raise on the first ``anext``."""
        agent = self._local_agent()
        try:
            if agent is None:
                yield await self._agent.read_file(path, limit=limit)
                return
            async for chunk in streams.read_chunks(agent, path):
                yield chunk
        except Exception as exc:
            raise map_error(exc, path) from None

    async def read_head(self, path: str, limit: int) -> tuple[bytes, bool]:
        """At most ``limit`` bytes from the start of the file, and whether it is longer; the rest
        is not transferred."""
        agent = self._local_agent()
        try:
            if agent is None:
                stat = await self._agent.stat(path)
                data = await self._agent.read_file(path, limit=max(limit, stat.size))
                return data[:limit], len(data) > limit
            return await streams.read_head(agent, path, limit)
        except Exception as exc:
            raise map_error(exc, path) from None

    async def write(
        self,
        path: str,
        data: bytes | AsyncIterable[bytes],
        metadata: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Create or replace the file (and its missing parents, as envd does) with ``data``, which
        may be a stream of chunks: they are pulled as the guest takes them. Its metadata becomes
        ``metadata`` (none: the previous file's is cleared, as in E2B)."""
        agent = self._local_agent()
        if metadata and agent is None:
            raise ConnectError("unimplemented", "file metadata is not available with --ray")

        async def write(account: str | None) -> None:  # the file is handed to the account
            await self._write_once(agent, path, data, account)

        try:
            try:
                await accounts.as_account(self._user, write)
            except GuestFileNotFoundError:  # raised before any chunk was pulled
                await self._mkdirs(path.rsplit("/", 1)[0] or "/")
                await accounts.as_account(self._user, write)
            if agent is not None:
                await set_metadata(agent, path, metadata or {})
        except RequestRejected:
            raise  # the upload broke a limit: the app answers 413/408
        except Exception as exc:
            raise map_error(exc, path) from None
        info: dict[str, Any] = {"name": path.rsplit("/", 1)[-1], "type": "file", "path": path}
        if metadata:
            info["metadata"] = metadata
        return info

    async def _write_once(
        self, agent: Agent | None, path: str, data: bytes | AsyncIterable[bytes], user: str | None
    ) -> None:
        if isinstance(data, bytes):
            await self._agent.write_file(path, data, user=user)
        elif agent is not None:
            await streams.write_chunks(agent, path, data, user=user)
        else:  # through a Ray proxy: whole (the request body cap bounds it)
            whole = b"".join([chunk async for chunk in data])
            await self._agent.write_file(path, whole, user=user)
