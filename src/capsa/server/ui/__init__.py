"""The dashboard of ``capsa serve`` at ``/ui`` (``--no-ui`` turns it off): server-rendered shell
pages and a small vanilla script per page, live data pushed by server-sent events, the terminal
over a WebSocket. Nothing is fetched from elsewhere: the assets ship in ``static/``.

The contract between its modules (so pieces can be built apart):

- Authentication is a session cookie, never ``X-API-KEY``: :mod:`.session` turns an API key into
  a signed, expiring cookie (``Sessions.login``), finds the :class:`~.session.UiSession` of any
  request or WebSocket (``Sessions.session_of``), and checks the CSRF token that every
  state-changing request carries in the ``X-CSRF-Token`` header (``require_csrf``: 403 if not).
- A route sees the sandboxes of ``session.principal.scope`` only (None: an admin key, all), the
  way the control plane scopes them: ``registry.find(id, scope)`` / ``registry.list(scope)``.
- :class:`~.deps.UiDeps` holds what routes need; every route module exposes
  ``routes(deps: UiDeps) -> list[BaseRoute]``, which :mod:`.app` collects.
- URLs: pages ``/ui/``, ``/ui/login``, ``/ui/sandboxes/{id}``, ``/ui/server``; JSON and streams
  under ``/ui/api/...`` (the terminal WebSocket ``/ui/api/sandboxes/{id}/terminal``, files
  ``/ui/api/sandboxes/{id}/files...``); assets ``/ui/static/...``.
- The sandbox page has ``<section id="terminal" data-sandbox="ID">`` and ``<section id="files"
  data-sandbox="ID">``, loads ``vendor/xterm/xterm.{js,css}``, ``terminal.js`` and ``files.js``
  (which mount themselves on those sections), and gives the CSRF token as
  ``<meta name="csrf-token" content="...">``."""
