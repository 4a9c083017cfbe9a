"""Live data as server-sent events: the sandbox list (``/ui/api/events``) and one sandbox's view
(``/ui/api/sandboxes/{id}/events``: its state, its new metrics samples and egress decisions).

Each stream looks every :data:`TICK` seconds and sends only what changed, so a page idles at
almost no cost; a stream ends when its browser goes (Starlette cancels it on disconnect), when its
session ends, and is refused (429) beyond :data:`~.streams.MAX_STREAMS`."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from capsa.server.api_error import ApiError
from capsa.server.listing import filter_sandboxes
from capsa.server.ui.deps import UiDeps
from capsa.server.ui.session import UiSession
from capsa.server.ui.views import Denials, decision_json, log_of, row

log = logging.getLogger(__name__)

TICK = 0.5  # seconds between looks at the registry
KEEPALIVE = 15.0  # seconds: a comment line keeps proxies from closing an idle stream
MAX_EGRESS_BATCH = 200  # decisions sent at once (the page keeps the newest)


def routes(deps: UiDeps) -> list[BaseRoute]:
    events = Events(deps)
    return [
        Route("/ui/api/events", events.sandboxes, methods=["GET"]),
        Route("/ui/api/sandboxes/{sandbox_id}/events", events.sandbox, methods=["GET"]),
    ]


def sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class Events:
    def __init__(self, deps: UiDeps) -> None:
        self.deps = deps
        self.denials = Denials()

    def _open(self, request: Request) -> UiSession:
        session = self.deps.sessions.require(request)
        if self.deps.streams.full():
            raise ApiError(429, "too many open dashboard streams", hint="close some dashboard tabs")
        return session

    async def sandboxes(self, request: Request) -> Response:
        session = self._open(request)
        query = request.query_params
        filter_sandboxes([], query)  # a bad filter is a 400 now, not a broken stream
        return _stream(self._sandboxes(request, session), self.deps, "list")

    async def _sandboxes(self, request: Request, session: UiSession) -> AsyncIterator[bytes]:
        last = None
        while self.deps.sessions.session_of(request) is not None:
            self.denials.forget({e.id for e in self.deps.registry.list()})
            entries = self.deps.registry.list(session.principal.scope)
            entries = filter_sandboxes(entries, request.query_params)
            entries.sort(key=lambda e: e.started_at, reverse=True)
            rows = [row(e, self.deps.sampler, await self.denials.count(e)) for e in entries]
            if rows != last:
                yield sse("sandboxes", {"sandboxes": rows, "at": time.time()})
                last = rows
            yield b""
            await asyncio.sleep(TICK)
        yield sse("ended", {"reason": "session"})

    async def sandbox(self, request: Request) -> Response:
        session = self._open(request)
        entry = self.deps.registry.find(request.path_params["sandbox_id"], session.principal.scope)
        return _stream(self._sandbox(request, session, entry.id), self.deps, "sandbox")

    async def _sandbox(
        self, request: Request, session: UiSession, sandbox_id: str
    ) -> AsyncIterator[bytes]:
        last_row = None
        sent = 0.0  # the time of the newest egress decision sent
        sampled = 0.0  # the time of the newest metrics sample sent (the page keeps the older ones)
        while self.deps.sessions.session_of(request) is not None:
            try:
                entry = self.deps.registry.find(sandbox_id, session.principal.scope)
            except ApiError:
                yield sse("gone", {"id": sandbox_id})
                return
            current = row(entry, self.deps.sampler, await self.denials.count(entry))
            current["lifecycle"] = {"autoPause": entry.auto_pause, "autoResume": entry.auto_resume}
            current["network"] = entry.policy is not None
            if current != last_row:
                samples = [s for s in self.deps.sampler.series(entry.id) if s.timestamp > sampled]
                current["metrics"] = [s.to_json() for s in samples]
                yield sse("sandbox", current)
                current.pop("metrics")
                last_row = current
                sampled = samples[-1].timestamp if samples else sampled
            fresh = [d for d in await log_of(entry) if d.time > sent][-MAX_EGRESS_BATCH:]
            if fresh:
                sent = fresh[-1].time
                yield sse("egress", [decision_json(d) for d in fresh])
            yield b""
            await asyncio.sleep(TICK)
        yield sse("ended", {"reason": "session"})


def _stream(body: AsyncIterator[bytes], deps: UiDeps, kind: str) -> StreamingResponse:
    async def tracked() -> AsyncIterator[bytes]:
        with deps.streams.track(kind):
            quiet = time.monotonic()
            async for chunk in body:
                if chunk:
                    quiet = time.monotonic()
                    yield chunk
                elif time.monotonic() - quiet >= KEEPALIVE:
                    quiet = time.monotonic()
                    yield b": keepalive\n\n"

    headers = {"cache-control": "no-store", "x-accel-buffering": "no"}
    return StreamingResponse(tracked(), media_type="text/event-stream", headers=headers)
