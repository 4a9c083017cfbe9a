"""The ASGI application of ``capsa serve``: one port for the control plane (``X-API-KEY``), the
sandboxes' envd and code interpreter (routed by the ``E2b-Sandbox-Id``/``E2b-Sandbox-Port`` headers
the SDKs send when ``E2B_SANDBOX_URL`` points here), ``/health`` and ``/metrics``.

Every request but ``/health`` and the sandboxes' own (authorized by their access token) needs an
API key; the key's :class:`Principal` (its tenant) goes to the routes in the ASGI scope."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from capsa.errors import CapsaError
from capsa.server.control import PRINCIPAL, ControlPlane, api_error, error_response, principal_of
from capsa.server.durable import DEFAULT_KEEP_ENDED, Journal
from capsa.server.ends import EndsApi
from capsa.server.entry import ApiError
from capsa.server.guest_metrics import DEFAULT_INTERVAL, Sampler
from capsa.server.ingress import Ingress, with_host_routing
from capsa.server.ingress_ws import relay_websocket
from capsa.server.limits import (
    INPUT_STREAM_IDLE,
    INPUT_STREAM_PATH,
    LimitedBody,
    Limits,
    RequestRejected,
    content_length,
    log_safe,
    single_header,
)
from capsa.server.metrics import Metrics
from capsa.server.registry import Registry
from capsa.server.sandbox_api import SandboxApi
from capsa.server.server_secrets import ServerSecrets
from capsa.server.signed_urls import has_signature
from capsa.server.statedb import StateDB, default_state_dir
from capsa.server.tenants import KeyRing, Principal
from capsa.server.ui.app import UiApp, body_cap, is_ui
from capsa.server.ui.deps import UiDeps
from capsa.server.ui.session import Sessions
from capsa.server.volume_api import VolumeApi
from capsa.server.volumes import ServerVolumes
from capsa.volume.store import DEFAULT_SIZE_MB

if TYPE_CHECKING:
    from capsa.sandbox import Sandbox

log = logging.getLogger(__name__)
access_log = logging.getLogger("capsa.server.access")

_PUBLIC = ("/health",)
_VOLUME_CONTENT = "/volumecontent/"


@dataclass
class ServerConfig:
    api_keys: KeyRing  # the accepted keys, their tenants and the tenants' limits
    pools: dict[str, int] = field(default_factory=dict)
    max_sandboxes: int | None = None
    max_timeout: int | None = None  # seconds (--max-timeout); None: no cap
    memory_mb: int = 512
    dns_servers: tuple[str, ...] = ()
    allow_internal_destinations: bool = False
    ray_address: str | None = None  # place sandboxes on this Ray cluster (capsa serve --ray)
    limits: Limits = field(default_factory=Limits)
    metrics_interval: float = DEFAULT_INTERVAL  # seconds between guest samples (0: none)
    domain: str = "localhost:3000"  # ingress hosts are {port}-{sandbox_id}.{domain} (--domain)
    state_dir: Path | None = None  # records and files kept across restarts (None: all in memory)
    shutdown_timeout: float = 30.0  # seconds to pause the running sandboxes at shutdown
    keep_ended: float = DEFAULT_KEEP_ENDED  # seconds an ended sandbox's record is kept
    volume_size_mb: int = DEFAULT_SIZE_MB  # --volume-size-mb: E2B's create has no size
    secrets: ServerSecrets = field(default_factory=ServerSecrets)  # --secrets-file, --upstream-ca
    ui: bool = True  # the dashboard at /ui (--no-ui: off)
    tls: bool = False  # served over HTTPS: the dashboard's cookie is Secure


class CapsaServer:
    """Holds the registry and builds the ASGI app (``server.app``)."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.metrics = Metrics(lambda: len(self.registry))
        self.journal = None
        if config.state_dir is not None:  # the lock and the checks: refused here, before serving
            self.journal = Journal(
                StateDB(config.state_dir),
                keep_ended=config.keep_ended,
                limits=config.limits,
                on_end=lambda reason: self.metrics.ends.labels(reason=reason).inc(),
            )
        self.registry = Registry(
            memory_mb=config.memory_mb,
            pools=config.pools,
            max_sandboxes=config.max_sandboxes,
            max_timeout=config.max_timeout,
            tenant_limits=dict(config.api_keys.limits),
            on_removed=self.metrics.removed,
            on_paused=self.metrics.count_denials,
            dns_servers=config.dns_servers,
            allow_internal_destinations=config.allow_internal_destinations,
            ray_address=config.ray_address,
            journal=self.journal,
            shutdown_timeout=config.shutdown_timeout,
            secrets=config.secrets,
        )
        self.sampler = Sampler(self.registry, config.metrics_interval, self.metrics.sampled)
        self.ready = False
        self.volumes = ServerVolumes(
            (config.state_dir or default_state_dir()) / "volumes",
            config.volume_size_mb,
            self._sandbox_exists,
            self._running_vm,
        )
        control = ControlPlane(
            self.registry, self.metrics, self.sampler, domain=config.domain, volumes=self.volumes
        )
        volume_api = VolumeApi(self.volumes, principal_of)
        routes = [
            Route("/health", self._health, methods=["GET"]),
            Route("/metrics", self._metrics, methods=["GET"]),
            *control.routes(),
            *volume_api.routes(),
            *EndsApi(self.journal, principal_of).routes(),
        ]
        self._volume_content: ASGIApp = Starlette(
            routes=volume_api.content_routes(), exception_handlers={CapsaError: self._on_error}
        )
        self._control: ASGIApp = Starlette(
            routes=routes,
            lifespan=self._lifespan,
            exception_handlers={CapsaError: self._on_error},
        )
        self._sandbox = SandboxApi(self.registry, self.metrics, config.limits)
        self.ingress = Ingress(self.registry, config.limits, config.domain)
        self.ui: UiApp | None = None
        if config.ui:
            self.ui = UiApp(self._ui_deps())
        self.app: ASGIApp = self._dispatch

    def _ui_deps(self) -> UiDeps:
        return UiDeps(
            registry=self.registry,
            sessions=Sessions(self.config.api_keys, secure=self.config.tls),
            sampler=self.sampler,
            metrics=self.metrics,
            limits=self.config.limits,
            keys=self.config.api_keys,
            pools=dict(self.config.pools),
            journal=self.journal,
            domain=self.config.domain,
            ready=lambda: self.ready and not self.registry.closed,
        )

    def _sandbox_exists(self, sandbox_id: str) -> bool:
        try:
            self.registry.find(sandbox_id)
        except ApiError:
            return False
        return True

    def _running_vm(self, sandbox_id: str) -> Sandbox | None:
        """The VM of a running sandbox (None if paused or gone): a mounted volume's content
        calls go through it."""
        try:
            entry = self.registry.find(sandbox_id)
        except ApiError:
            return None
        return entry.vm if entry.running else None

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        await asyncio.to_thread(self.volumes.load)
        await self.registry.start()
        self.sampler.start()
        self.ready = True
        log.info("capsa serve ready")
        try:
            yield
        finally:
            self.ready = False
            verb = "killing" if self.journal is None else "pausing"
            log.info("capsa serve stopping: %s %d sandboxes", verb, len(self.registry))
            await self.sampler.close()
            await self.volumes.close()
            await self.registry.close()
            if self.journal is not None:
                self.journal.close()

    async def _on_error(self, request: Request, exc: Exception) -> Response:
        return api_error(exc)

    async def _health(self, request: Request) -> Response:
        if not self.ready or self.registry.closed:
            return JSONResponse({"status": "starting"}, status_code=503)
        return JSONResponse({"status": "ok", "sandboxes": len(self.registry)})

    async def _metrics(self, request: Request) -> Response:
        """Server-wide series for any key; the per-sandbox ones only for the caller's
        sandboxes (all of them for an admin key)."""
        scope = principal_of(request).scope
        own = None if scope is None else {e.id for e in self.registry.list(scope)}
        body = await self.metrics.collect(
            (e for e in self.registry.list() if e.paused is None),
            None if own is None else own.__contains__,
        )
        return Response(body, media_type="text/plain; version=0.0.4")

    def _principal(self, headers: dict[str, str]) -> Principal | None:
        key = headers.get("x-api-key")
        if key is None:
            bearer = headers.get("authorization", "")
            key = bearer.removeprefix("Bearer ") if bearer.startswith("Bearer ") else None
        return self.config.api_keys.principal(key)

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            try:
                target = self.ingress.route(scope, single_header(scope["headers"], b"e2b-sandbox-id"))
            except RequestRejected:
                target = None
            if target is not None:
                await relay_websocket(self.ingress, scope, receive, send, target)
                return
            if self.ui is not None and is_ui(scope["path"]):  # the dashboard's terminal
                await self.ui(scope, receive, send)
                return
        if scope["type"] != "http":
            await self._control(scope, receive, send)
            return
        headers = _headers(scope["headers"])
        started = time.monotonic()
        status = [0]

        async def send_logged(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        sandbox_id: str | None = None
        try:
            scope = with_host_routing(scope, self.config.domain)  # 49983-{id}.{domain}: envd
            target = self.ingress.route(scope, single_header(scope["headers"], b"e2b-sandbox-id"))
            sandbox_id, body = self._admit(scope, ingress=target is not None)
            if target is not None:  # a request for a port of the sandbox (get_host)
                sandbox_id = target[0]
                await self.ingress.http(scope, receive, send_logged, *target)
            elif sandbox_id is not None or _signed_url(scope):
                await self._sandbox_asgi(scope, body.bind(receive), send_logged)
            elif scope["path"].startswith(_VOLUME_CONTENT):  # the volume's token, not an API key
                await self._volume_content(scope, body.bind(receive), send_logged)
            elif scope["path"] in _PUBLIC:
                await self._control(scope, body.bind(receive), send_logged)
            elif self.ui is not None and is_ui(scope["path"]):  # its session cookie, not a key
                await self.ui(scope, body.bind(receive), send_logged)
            elif (principal := self._principal(headers)) is not None:
                await self._control({**scope, PRINCIPAL: principal}, body.bind(receive), send_logged)
            else:
                await error_response(401, "invalid API key")(scope, receive, send_logged)
        except RequestRejected as exc:
            if status[0]:  # the response had begun: all that is left is to end the connection
                raise
            reply = error_response(exc.status, exc.message)
            reply.headers["connection"] = "close"  # the unread rest of the request is discarded
            await reply(scope, receive, send_logged)
        finally:
            self.metrics.requests.labels(status=str(status[0])).inc()
            access_log.info(
                "%s %s %s %.1fms sandbox=%s",
                log_safe(scope["method"]),
                log_safe(scope["path"]),
                status[0],
                (time.monotonic() - started) * 1000,
                "-" if sandbox_id is None else log_safe(sandbox_id),
            )

    def _admit(self, scope: Scope, *, ingress: bool = False) -> tuple[str | None, _BodyCap]:
        """Check what every route relies on before any runs: the routing headers are single (a
        proxy and this server must agree on the sandbox) and printable, and a declared body fits
        the request's cap (else 413 before a byte of it is read)."""
        raw = scope["headers"]
        sandbox_id = single_header(raw, b"e2b-sandbox-id")
        for name in (b"e2b-sandbox-port", b"x-access-token", b"e2b-traffic-access-token"):
            single_header(raw, name)
        limits = self.config.limits
        if ingress:  # streamed to the guest server as it arrives
            cap = limits.max_upload_bytes
        elif sandbox_id is None and scope["path"].startswith(_VOLUME_CONTENT):
            cap = limits.max_upload_bytes  # a file written into a volume
        elif sandbox_id is None and is_ui(scope["path"]):
            cap = body_cap(scope["path"], limits)
        elif sandbox_id is None and not _signed_url(scope):
            cap = limits.max_json_bytes
        elif scope["path"] in ("/files", INPUT_STREAM_PATH):  # streamed to the guest
            cap = limits.max_upload_bytes
        else:
            cap = limits.max_rpc_bytes
        declared = content_length(raw)
        if declared is not None and declared > cap:
            raise RequestRejected(413, f"the request body is larger than {cap} bytes")
        idle = limits.body_timeout
        if scope["path"] == INPUT_STREAM_PATH:
            idle = max(idle, INPUT_STREAM_IDLE)
        return sandbox_id, _BodyCap(cap, idle)

    async def _sandbox_asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = await self._sandbox(Request(scope, receive))
        await response(scope, receive, send)


def _signed_url(scope: Scope) -> bool:
    """A ``/files`` request without routing headers but signed: the sandbox API finds its sandbox
    by the signature (``signed_urls``)."""
    return scope["path"] == "/files" and has_signature(scope.get("query_string", b""))


@dataclass(frozen=True)
class _BodyCap:
    limit: int
    idle_timeout: float

    def bind(self, receive: Receive) -> Receive:
        return LimitedBody(receive, self.limit, self.idle_timeout)


def _headers(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in raw}


def create_app(config: ServerConfig) -> CapsaServer:
    return CapsaServer(config)
