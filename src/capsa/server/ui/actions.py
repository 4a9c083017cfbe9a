"""What the pages change: kill, pause, resume and extend a sandbox's timeout. Each needs the
session and its CSRF token, and acts within the session's tenant exactly as the control plane does
for an API key (another tenant's sandbox is not found)."""

from __future__ import annotations

import json
import logging
import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from capsa.server.api_error import ApiError
from capsa.server.ui.deps import UiDeps
from capsa.server.ui.session import UiSession, require_csrf

log = logging.getLogger(__name__)

EXTEND_DEFAULT = 300  # seconds "+5 min" adds


def routes(deps: UiDeps) -> list[BaseRoute]:
    actions = Actions(deps)
    base = "/ui/api/sandboxes/{sandbox_id}"
    return [
        Route(base + "/kill", actions.kill, methods=["POST"]),
        Route(base + "/pause", actions.pause, methods=["POST"]),
        Route(base + "/resume", actions.resume, methods=["POST"]),
        Route(base + "/extend", actions.extend, methods=["POST"]),
    ]


class Actions:
    def __init__(self, deps: UiDeps) -> None:
        self.deps = deps

    def _checked(self, request: Request) -> UiSession:
        session = self.deps.sessions.require(request)
        require_csrf(request, session)
        return session

    async def kill(self, request: Request) -> Response:
        session = self._checked(request)
        sandbox_id = request.path_params["sandbox_id"]
        await self.deps.registry.kill(sandbox_id, session.principal.scope)
        log.info("dashboard (%s): killed %s", session.principal.tenant, sandbox_id)
        return Response(status_code=204)

    async def pause(self, request: Request) -> Response:
        session = self._checked(request)
        await self.deps.registry.pause(request.path_params["sandbox_id"], session.principal.scope)
        return Response(status_code=204)

    async def resume(self, request: Request) -> Response:
        session = self._checked(request)
        entry = await self.deps.registry.resume(
            request.path_params["sandbox_id"], None, session.principal.scope
        )
        return JSONResponse({"id": entry.id, "state": entry.state})

    async def extend(self, request: Request) -> Response:
        """The timeout from now becomes the time left plus ``seconds`` (default 5 minutes)."""
        session = self._checked(request)
        seconds = (await _json(request)).get("seconds", EXTEND_DEFAULT)
        if not isinstance(seconds, int) or isinstance(seconds, bool) or not 0 < seconds <= 86400:
            raise ApiError(400, "seconds must be a whole number from 1 to 86400")
        entry = self.deps.registry.find(request.path_params["sandbox_id"], session.principal.scope)
        if not entry.running:
            raise ApiError(409, f"sandbox {entry.id} is paused", hint="resume it first")
        left = max(0, int(entry.end_at.timestamp() - time.time()))
        timeout = self.deps.registry.check_timeout(left + seconds)
        await entry.set_timeout(timeout)
        return JSONResponse({"id": entry.id, "end": entry.end_at.timestamp()})


async def _json(request: Request) -> dict[str, object]:
    raw = await request.body()
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        raise ApiError(400, "the request body is not JSON") from None
    if not isinstance(value, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return value
