"""The ``/ui`` sub-application: the routes of every dashboard module, the assets, and the headers
every answer carries. :class:`capsa.server.app.CapsaServer` sends it the requests under ``/ui``
(authenticated here by the session cookie, not by ``X-API-KEY``)."""

from __future__ import annotations

import logging
from html import escape
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from capsa.errors import CapsaError
from capsa.server.api_error import ApiError
from capsa.server.limits import Limits
from capsa.server.ui import actions, events, files, info, pages, terminal
from capsa.server.ui.deps import UiDeps
from capsa.server.ui.html import page

log = logging.getLogger(__name__)

PREFIX = "/ui"
STATIC = Path(__file__).parent / "static"
_FILES = "/files"  # under /ui/api/sandboxes/{id}: uploads may be as large as the sandbox API's
# Only this origin's scripts, styles and connections; no framing (clickjacking a kill button).
# xterm.js writes style elements at run time: inline styles are allowed, inline scripts are not.
_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
_HEADERS = [
    (b"content-security-policy", _CSP.encode()),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),  # no-referrer would make forms send "Origin: null"
]


def is_ui(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/")


def body_cap(path: str, limits: Limits) -> int:
    """The largest request body a ``/ui`` route reads: an upload's for the file routes, else a
    small JSON or form body's."""
    if path.startswith(PREFIX + "/api/sandboxes/") and _FILES in path:
        return limits.max_upload_bytes
    return limits.max_json_bytes


class UiApp:
    """An ASGI app serving ``/ui``; ``route_sets`` are the modules' ``routes(deps)``."""

    def __init__(self, deps: UiDeps, extra: tuple[BaseRoute, ...] = ()) -> None:
        self.deps = deps
        routes: list[BaseRoute] = [
            *pages.routes(deps),
            *events.routes(deps),
            *actions.routes(deps),
            *info.routes(deps),
            *terminal.routes(deps),
            *files.routes(deps),
            *extra,
            Mount(PREFIX + "/static", StaticFiles(directory=STATIC), name="static"),
        ]
        self._app: ASGIApp = Starlette(routes=routes, exception_handlers={CapsaError: _on_error})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *_HEADERS]
            await send(message)

        await self._app(scope, receive, with_headers)


async def _on_error(request: Request, exc: Exception) -> Response:
    """JSON for ``/ui/api``, a page for a page (an unknown sandbox's, say)."""
    status = exc.status if isinstance(exc, ApiError) else 500
    message = exc.message if isinstance(exc, CapsaError) else "internal error"
    if status >= 500:
        log.warning("dashboard request %s failed: %s", request.url.path, exc)
    if request.url.path.startswith(PREFIX + "/api/"):
        return JSONResponse({"code": status, "message": message}, status_code=status)
    body = f'<h1>{status}</h1><p class="error">{escape(message)}</p><p><a href="/ui/">Sandboxes</a></p>'
    return HTMLResponse(page(str(status), body), status_code=status)
