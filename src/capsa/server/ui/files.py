"""The dashboard's file browser: list a sandbox's directory, download a file, upload files, through
the library's guest file API (:class:`capsa.server.filesystem.Filesystem`, as envd's ``/files``):
what an upload writes belongs to the sandbox's default account, as E2B's files API makes it.

Routes (the session cookie authenticates; a tenant reaches only its own sandboxes):

- ``GET  /ui/api/sandboxes/{id}/files?path=DIR``: ``{"path", "parent", "entries": [{"name",
  "type", "size", "mtime"}], "truncated"}`` (relative paths start in the account's home).
- ``GET  /ui/api/sandboxes/{id}/files/download?path=FILE``: the file, streamed, as an attachment.
  It is served so that a browser never renders it on the dashboard's origin (``attachment``,
  ``application/octet-stream``, ``nosniff`` and a ``sandbox`` CSP): an HTML file written by the
  sandbox's code must not run script with the dashboard's session.
- ``POST /ui/api/sandboxes/{id}/files?path=P``: a ``multipart/form-data`` body writes each file
  part as ``P/<its file name>`` (``P`` a directory); any other body is the content of the file
  ``P``. Streamed to the guest, at most the server's ``max_upload_bytes``; it needs the session's
  CSRF token in ``X-CSRF-Token``.
"""

from __future__ import annotations

import functools
import posixpath
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from capsa.server.api_error import ApiError
from capsa.server.connect import ConnectError
from capsa.server.entry import Entry
from capsa.server.envd import map_error
from capsa.server.filesystem import Filesystem, entry_info
from capsa.server.limits import RequestRejected
from capsa.server.ui.deps import UiDeps
from capsa.server.ui.session import require_csrf
from capsa.server.uploads import MultipartFiles

MAX_ENTRIES = 5000  # entries of one listing shown (the rest: "truncated")
MAX_UPLOAD_FILES = 100  # file parts in one upload form
MAX_NAME = 255  # bytes of an uploaded file's name
_TYPES = {"file": "file", "dir": "dir", "symlink": "symlink"}
# with the dashboard's own headers on every answer (``nosniff``, its CSP, no framing: ui/app.py)
_DOWNLOAD_HEADERS = {
    "content-security-policy": "sandbox; default-src 'none'",
    "cache-control": "no-store",
}


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"code": status, "message": message}, status_code=status)


def _connect_status(exc: ConnectError) -> JSONResponse:
    return _error(exc.status, exc.message)


def upload_name(filename: str) -> str:
    """A multipart part's file name as one path component: a browser sends a base name, anything
    with a separator, ``.``/``..``, a NUL or control character is refused (400)."""
    name = filename.strip()
    if (
        not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or not name.isprintable()
        or len(name.encode()) > MAX_NAME
    ):
        raise RequestRejected(400, f"invalid file name {filename[:80]!r}")
    return name


def attachment(path: str) -> str:
    """A ``Content-Disposition`` naming the file (RFC 6266: an ASCII fallback and the UTF-8 name)."""
    name = posixpath.basename(path) or "download"
    fallback = "".join(c if c.isascii() and c.isprintable() and c not in '"\\' else "_" for c in name)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"


async def capped(body: AsyncIterator[bytes], limit: int) -> AsyncIterator[bytes]:
    """``body``, refused with 413 once more than ``limit`` bytes came (whatever cap the app's
    own body guard applies to this path)."""
    total = 0
    async for chunk in body:
        total += len(chunk)
        if total > limit:
            raise RequestRejected(413, f"the upload is larger than {limit} bytes")
        yield chunk


async def list_directory(entry: Entry, fs: Filesystem, path: str) -> dict[str, Any]:
    try:
        rows = await entry.vm.agent.list_dir(path)
    except Exception as exc:
        raise map_error(exc, path) from None
    entries = []
    for row in rows[:MAX_ENTRIES]:
        child = f"{path.rstrip('/')}/{row.name}"
        info = entry_info(child, row.type, row.size, row.mode, row.mtime)
        entries.append(
            {
                "name": row.name,
                "type": _TYPES.get(row.type, "other"),
                "size": row.size,
                "mtime": info["modifiedTime"],
            }
        )
    parent = None if path == "/" else posixpath.dirname(path.rstrip("/")) or "/"
    return {
        "path": path,
        "parent": parent,
        "home": fs.home,
        "entries": entries,
        "truncated": len(rows) > MAX_ENTRIES,
    }


def _answering_errors(
    handler: Callable[[Request], Awaitable[Response]],
) -> Callable[[Request], Awaitable[Response]]:
    """The dashboard's JSON error answer for what every file route may raise: a refused request
    (:class:`ApiError`) or a failed guest call (:class:`ConnectError`)."""

    @functools.wraps(handler)
    async def answer(request: Request) -> Response:
        try:
            return await handler(request)
        except ApiError as exc:
            return _error(exc.status, exc.message)
        except ConnectError as exc:
            return _connect_status(exc)

    return answer


def routes(deps: UiDeps) -> list[BaseRoute]:
    def sandbox(request: Request) -> Entry:
        """The sandbox the session may see, or an :class:`ApiError` (401 without a session, 404
        for an unknown id or another tenant's, with the same answer)."""
        session = deps.sessions.require(request)
        return deps.registry.get(request.path_params["sandbox_id"], session.principal.scope)

    @_answering_errors
    async def listing(request: Request) -> Response:
        entry = sandbox(request)
        fs = Filesystem(entry.vm)
        path = fs.path(request.query_params.get("path") or fs.home)
        return JSONResponse(await list_directory(entry, fs, path))

    @_answering_errors
    async def download(request: Request) -> Response:
        entry = sandbox(request)
        fs = Filesystem(entry.vm)
        path = fs.path(request.query_params.get("path"))
        try:
            st = await entry.vm.agent.stat(path)
        except Exception as exc:
            raise map_error(exc, path) from None
        if st.type != "file":
            return _error(400, f"{path} is not a regular file")
        chunks = fs.read_chunks(path, deps.limits.max_upload_bytes)
        first = await anext(chunks, b"")  # an unreadable file is an error, not a 200

        async def body() -> AsyncIterator[bytes]:
            yield first
            async for chunk in chunks:
                yield chunk

        headers = {**_DOWNLOAD_HEADERS, "content-disposition": attachment(path)}
        return StreamingResponse(body(), media_type="application/octet-stream", headers=headers)

    @_answering_errors
    async def upload(request: Request) -> Response:
        try:
            entry = sandbox(request)
            require_csrf(request, deps.sessions.require(request))
            fs = Filesystem(entry.vm)
            target = fs.path(request.query_params.get("path"))
            limit = deps.limits.max_upload_bytes
            body = capped(request.stream(), limit)
            content_type = request.headers.get("content-type", "")
            written = []
            if content_type.startswith("multipart/form-data"):
                async for name, part in MultipartFiles(body, content_type, MAX_UPLOAD_FILES):
                    path = posixpath.join(target, upload_name(name))
                    written.append(await fs.write(path, part))
            else:
                written.append(await fs.write(target, body))
            return JSONResponse({"written": [info["path"] for info in written]})
        except RequestRejected as exc:  # the unread rest of the body is discarded with the connection
            reply = _error(exc.status, exc.message)
            reply.headers["connection"] = "close"
            return reply

    base = "/ui/api/sandboxes/{sandbox_id}/files"
    return [
        Route(base, listing, methods=["GET"]),
        Route(base, upload, methods=["POST"]),
        Route(base + "/download", download, methods=["GET"]),
    ]
