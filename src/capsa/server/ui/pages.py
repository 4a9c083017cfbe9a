"""The dashboard's pages: server-rendered shells that their scripts fill from ``/ui/api``. A page
asked for without a session redirects to the login page; the login page turns an API key into the
session cookie (:mod:`.session`)."""

from __future__ import annotations

from html import escape
from urllib.parse import quote, urlsplit

from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from capsa.server.ui.deps import UiDeps
from capsa.server.ui.html import page
from capsa.server.ui.session import UiSession, require_csrf

_MAX_KEY = 512  # characters of a typed API key
_NO_STORE = {"cache-control": "no-store"}


def routes(deps: UiDeps) -> list[BaseRoute]:
    pages = Pages(deps)
    return [
        Route("/ui", pages.to_index, methods=["GET"]),
        Route("/ui/", pages.index, methods=["GET"]),
        Route("/ui/login", pages.login_form, methods=["GET"]),
        Route("/ui/login", pages.login, methods=["POST"]),
        Route("/ui/logout", pages.logout, methods=["POST"]),
        Route("/ui/server", pages.server, methods=["GET"]),
        Route("/ui/sandboxes/{sandbox_id}", pages.sandbox, methods=["GET"]),
    ]


class Pages:
    def __init__(self, deps: UiDeps) -> None:
        self.deps = deps

    async def to_index(self, request: Request) -> Response:
        return RedirectResponse("/ui/", status_code=303)

    def _session(self, request: Request) -> UiSession | Response:
        session = self.deps.sessions.session_of(request)
        if session is None:
            return RedirectResponse(f"/ui/login?next={quote(request.url.path)}", status_code=303)
        return session

    async def login_form(self, request: Request, error: str = "", status: int = 200) -> Response:
        note = f'<p class="error" role="alert">{escape(error)}</p>' if error else ""
        target = safe_next(request.query_params.get("next", "/ui/"))
        body = (
            '<section class="login"><h1>Log in</h1>'
            f'<form method="post" action="/ui/login?next={escape(quote(target))}">'
            '<label for="api_key">API key</label>'
            '<input id="api_key" name="api_key" type="password" autocomplete="current-password" '
            f'required autofocus maxlength="{_MAX_KEY}">'
            f'<button type="submit" id="login">Log in</button></form>{note}</section>'
        )
        return HTMLResponse(page("Log in", body), status_code=status, headers=_NO_STORE)

    async def login(self, request: Request) -> Response:
        if not same_origin(request):  # another site's form logging the browser in as someone else
            return await self.login_form(request, "Log in from this server's own page.", 403)
        form = await request.form(max_files=0, max_fields=4)
        key = form.get("api_key")
        cookie = None
        if isinstance(key, str) and 0 < len(key) <= _MAX_KEY:
            cookie = self.deps.sessions.login(key.strip())
        if cookie is None:
            return await self.login_form(request, "That API key is not accepted.", 401)
        response = RedirectResponse(safe_next(request.query_params.get("next", "/ui/")), status_code=303)
        self.deps.sessions.set_cookie(response, cookie)
        return response

    async def logout(self, request: Request) -> Response:
        session = self.deps.sessions.require(request)
        require_csrf(request, session)
        self.deps.sessions.logout(session)
        response = Response(status_code=204)
        self.deps.sessions.clear_cookie(response)
        return response

    async def index(self, request: Request) -> Response:
        session = self._session(request)
        if isinstance(session, Response):
            return session
        body = (
            '<h1>Sandboxes <span id="count" class="muted"></span></h1>'
            '<form id="filters" class="filters">'
            '<label>State <select name="state"><option value="">any</option>'
            '<option value="running">running</option><option value="paused">paused</option>'
            "</select></label>"
            '<label>Template <input name="template" placeholder="any"></label>'
            '<label>Metadata <input name="metadata" placeholder="key=value&amp;key2=value2"></label>'
            '<span id="live" class="live" title="live updates">○</span></form>'
            '<table id="sandboxes"><thead><tr><th>Id</th><th>Template</th><th>State</th><th>Age</th>'
            "<th>Time left</th><th>CPU</th><th>Memory</th><th>Denied</th><th>Metadata</th><th></th></tr>"
            '</thead><tbody></tbody></table><p id="empty" class="muted" hidden>No sandboxes.</p>'
            '<p id="error" class="error" role="alert" hidden></p>'
        )
        html = page("Sandboxes", body, session=session, scripts=("list.js",))
        return HTMLResponse(html, headers=_NO_STORE)

    async def sandbox(self, request: Request) -> Response:
        session = self._session(request)
        if isinstance(session, Response):
            return session
        entry = self.deps.registry.find(request.path_params["sandbox_id"], session.principal.scope)
        sid = escape(entry.id)
        body = (
            f'<h1>Sandbox <code id="sandbox-id">{sid}</code> <span id="state" class="state"></span></h1>'
            '<p id="gone" class="error" role="alert" hidden></p>'
            '<div class="actions" id="actions">'
            '<button type="button" data-action="pause">Pause</button>'
            '<button type="button" data-action="resume">Resume</button>'
            '<button type="button" data-action="extend">+5 min</button>'
            '<button type="button" data-action="kill" class="danger">Kill</button></div>'
            '<dl id="facts" class="facts"></dl>'
            '<section id="metrics"><h2>Metrics</h2><div id="chart" class="chart"></div></section>'
            f'<section id="terminal" data-sandbox="{sid}"><h2>Terminal</h2></section>'
            f'<section id="files" data-sandbox="{sid}"><h2>Files</h2></section>'
            '<section id="processes"><h2>Processes <button type="button" id="processes-refresh">'
            "Refresh</button></h2><table><thead><tr><th>PID</th><th>User</th><th>Running for</th>"
            "<th>Memory</th><th>Command</th></tr></thead><tbody></tbody></table></section>"
            '<section id="egress"><h2>Egress log</h2><table><thead><tr><th>Time</th><th>Proto</th>'
            "<th>Destination</th><th>Rule</th><th>Action</th></tr></thead><tbody></tbody></table>"
            '<p class="muted" id="egress-none">No network decisions yet.</p></section>'
        )
        html = page(
            f"Sandbox {entry.id}",
            body,
            session=session,
            scripts=(
                "sandbox.js",
                "vendor/xterm/xterm.js",
                "vendor/xterm/addon-fit.js",
                "terminal.js",
                "files.js",
            ),
            styles=("vendor/xterm/xterm.css",),
            data={"sandbox": entry.id},
        )
        return HTMLResponse(html, headers=_NO_STORE)

    async def server(self, request: Request) -> Response:
        session = self._session(request)
        if isinstance(session, Response):
            return session
        body = (
            '<h1>Server</h1><dl id="health" class="facts"></dl>'
            '<section id="pools"><h2>Pools</h2><table><thead><tr><th>Template</th><th>Size</th>'
            "<th>Ready</th></tr></thead><tbody></tbody></table></section>"
            '<section id="templates"><h2>Templates and images</h2><table><thead><tr><th>Name</th>'
            "<th>Kind</th><th>Running</th></tr></thead><tbody></tbody></table></section>"
            '<section id="ends"><h2>Recent ends</h2><table><thead><tr><th>Sandbox</th><th>Template</th>'
            "<th>Ended</th><th>Reason</th><th>Detail</th></tr></thead><tbody></tbody></table>"
            '<p class="muted" id="ends-none" hidden></p></section>'
        )
        html = page("Server", body, session=session, scripts=("server.js",))
        return HTMLResponse(html, headers=_NO_STORE)


def same_origin(request: Request) -> bool:
    """Whether a form post comes from this server's pages: its ``Origin`` (sent by browsers with
    every POST) names the host it was sent to; no ``Origin`` (a non-browser client) passes."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    return urlsplit(origin).netloc == request.headers.get("host", "")


def safe_next(target: str) -> str:
    """Where the login goes next: a dashboard page only (no open redirect)."""
    if target.startswith("/ui/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/ui/"
