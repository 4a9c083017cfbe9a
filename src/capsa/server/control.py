"""The E2B control plane (``api.e2b.app``): create, list, inspect, time out and kill sandboxes.

Every route acts for the :class:`Principal` the app put in the request's scope (the API key's
tenant): a sandbox belongs to its creator's tenant, and another tenant's id is not found (the same
404 as an unknown id), unless the key is an admin key."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from capsa.errors import CapsaError
from capsa.server.interpreter import interpreter_for
from capsa.server.listing import NEXT_TOKEN, descending, filter_sandboxes, page, sandbox_key
from capsa.server.metrics import Metrics
from capsa.server.network import check_network, e2b_policy
from capsa.server.registry import (
    DEFAULT_TIMEOUT,
    ENVD_VERSION,
    INTERPRETER_TEMPLATE,
    TEMPLATES,
    ApiError,
    Entry,
    Registry,
    check_timeout,
)
from capsa.server.snapshot_api import SnapshotApi, create_from_snapshot
from capsa.server.tenants import Principal

log = logging.getLogger(__name__)

PRINCIPAL = "capsa.principal"  # the ASGI scope key under which the app passes the caller


def principal_of(request: Request) -> Principal:
    principal = request.scope.get(PRINCIPAL)
    if not isinstance(principal, Principal):  # the app routes no unauthenticated call here
        raise ApiError(401, "invalid API key")
    return principal


def _scope(request: Request) -> str | None:
    return principal_of(request).scope


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"code": status, "message": message}, status_code=status)


def _iso(stamp: Any) -> str:
    return str(stamp.isoformat().replace("+00:00", "Z"))


def sandbox_json(entry: Entry) -> dict[str, Any]:
    return {
        "templateID": entry.template,
        "sandboxID": entry.id,
        "clientID": "capsa",
        "envdVersion": ENVD_VERSION,
        "envdAccessToken": entry.token,
        "trafficAccessToken": entry.token,
        "alias": entry.template,
    }


def listed_json(entry: Entry) -> dict[str, Any]:
    return {
        "templateID": entry.template,
        "alias": entry.template,
        "sandboxID": entry.id,
        "clientID": "capsa",
        "startedAt": _iso(entry.started_at),
        "endAt": _iso(entry.end_at),
        "cpuCount": 1,
        "memoryMB": entry.memory_mb,
        "diskSizeMB": 0,
        "state": entry.state,
        "envdVersion": ENVD_VERSION,
        "metadata": _metadata(entry),
        "tenant": entry.tenant,  # not E2B's: the SDKs ignore it; admin keys see whose it is
    }


NODE_KEY = "capsa_ray_node_id"  # in a --ray sandbox's metadata: the Ray node it runs on


def _metadata(entry: Entry) -> dict[str, str]:
    if entry.node_id is None:
        return entry.metadata
    return {**entry.metadata, NODE_KEY: entry.node_id}


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nesting too deep
        raise ApiError(400, "the request body is not JSON") from None
    if not isinstance(value, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return value


def _strings(value: object, what: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ApiError(400, f"{what} must map strings to strings")
    return value


class ControlPlane:
    def __init__(self, registry: Registry, metrics: Metrics) -> None:
        self.registry = registry
        self.metrics = metrics
        self.snapshots = SnapshotApi(registry, sandbox_json, principal_of, _body)

    def routes(self) -> list[Route]:
        return [
            Route("/sandboxes", self.create, methods=["POST"]),
            Route("/v2/sandboxes", self.create, methods=["POST"]),
            Route("/sandboxes", self.list, methods=["GET"]),
            Route("/v2/sandboxes", self.list, methods=["GET"]),
            Route("/sandboxes/{sandbox_id}", self.get, methods=["GET"]),
            Route("/sandboxes/{sandbox_id}", self.kill, methods=["DELETE"]),
            Route("/sandboxes/{sandbox_id}/timeout", self.set_timeout, methods=["POST"]),
            Route("/sandboxes/{sandbox_id}/refreshes", self.refresh, methods=["POST"]),
            Route("/sandboxes/{sandbox_id}/connect", self.connect, methods=["POST"]),
            Route("/v2/sandboxes/{sandbox_id}/connect", self.connect, methods=["POST"]),
            Route("/sandboxes/{sandbox_id}/metrics", self.metrics_of, methods=["GET"]),
            Route("/sandboxes/{sandbox_id}/pause", self.pause, methods=["POST"]),
            Route("/sandboxes/{sandbox_id}/resume", self.connect, methods=["POST"]),
            *self.snapshots.routes(),
            Route("/sandboxes/{sandbox_id}/network", self.unsupported, methods=["PUT"]),
        ]

    async def create(self, request: Request) -> Response:
        body = await _body(request)
        template = body.get("templateID") or "base"
        if not isinstance(template, str):
            raise ApiError(400, "templateID must be a string")
        timeout = check_timeout(body.get("timeout", DEFAULT_TIMEOUT))
        internet = body.get("allow_internet_access", body.get("allowInternetAccess"))
        network = body.get("network")
        check_network(internet, network)  # cheap; the policy is made once a slot is taken
        started = time.monotonic()
        metadata = _strings(body.get("metadata"), "metadata")
        envs = _strings(body.get("envVars"), "envVars")
        tenant = principal_of(request).tenant
        saved = (
            None if template in TEMPLATES else self.registry.snapshots.find(template, _scope(request))
        )
        if saved is not None:  # Sandbox.create(snapshot_id)
            if network:
                raise ApiError(
                    400,
                    "a sandbox created from a snapshot keeps the snapshot's network settings",
                    hint="leave out network, or create the source sandbox with the settings wanted",
                )
            entry = await create_from_snapshot(
                self.registry, saved, timeout=timeout, metadata=metadata, envs=envs, tenant=tenant
            )
        else:
            entry = await self.registry.create(
                template,
                timeout=timeout,
                metadata=metadata,
                envs=envs,
                make_policy=lambda: e2b_policy(internet, network),
                tenant=tenant,
            )
        self.metrics.created(time.monotonic() - started, template)
        if template == INTERPRETER_TEMPLATE:
            await interpreter_for(entry).warm()
        return JSONResponse(sandbox_json(entry), status_code=201)

    async def list(self, request: Request) -> Response:
        """E2B's list: filters (state, metadata, template, startedAfter), order by start time
        (newest first unless ``order=asc``) and, on ``/v2``, pages of ``limit`` with an
        ``x-next-token``."""
        query = request.query_params
        entries = filter_sandboxes(self.registry.list(_scope(request)), query)
        if request.url.path == "/sandboxes":  # E2B's v1 list: every sandbox, in one reply
            entries.sort(key=sandbox_key, reverse=descending(query))
            return JSONResponse([listed_json(e) for e in entries])
        chosen, token = page(entries, sandbox_key, query, descending=descending(query))
        headers = {NEXT_TOKEN: token} if token else None
        return JSONResponse([listed_json(e) for e in chosen], headers=headers)

    async def get(self, request: Request) -> Response:
        entry = self.registry.find(request.path_params["sandbox_id"], _scope(request))
        detail = listed_json(entry)
        detail["envdAccessToken"] = entry.token
        return JSONResponse(detail)

    async def kill(self, request: Request) -> Response:
        await self.registry.kill(request.path_params["sandbox_id"], _scope(request))
        return Response(status_code=204)

    async def set_timeout(self, request: Request) -> Response:
        entry = self.registry.get(request.path_params["sandbox_id"], _scope(request))
        await entry.set_timeout(check_timeout((await _body(request)).get("timeout")))
        return Response(status_code=204)

    async def refresh(self, request: Request) -> Response:
        entry = self.registry.get(request.path_params["sandbox_id"], _scope(request))
        duration = (await _body(request)).get("duration")
        if duration is not None:
            await entry.set_timeout(check_timeout(duration))
        return Response(status_code=204)

    async def metrics_of(self, request: Request) -> Response:
        self.registry.get(request.path_params["sandbox_id"], _scope(request))
        return JSONResponse([])  # per-sandbox CPU/memory series are not collected (yet)

    async def unsupported(self, request: Request) -> Response:
        self.registry.get(request.path_params["sandbox_id"], _scope(request))
        action = request.url.path.rsplit("/", 1)[-1]
        raise ApiError(501, f"{action} is not supported by capsa serve yet")

    async def pause(self, request: Request) -> Response:
        await self.registry.pause(request.path_params["sandbox_id"], _scope(request))
        return Response(status_code=204)

    async def connect(self, request: Request) -> Response:
        """Connect to a sandbox; a paused one is resumed from its snapshot first."""
        timeout = (await _body(request)).get("timeout")
        entry = await self.registry.resume(
            request.path_params["sandbox_id"],
            None if timeout is None else check_timeout(timeout),
            _scope(request),
        )
        return JSONResponse(sandbox_json(entry), status_code=200)


def api_error(exc: Exception) -> JSONResponse:
    if isinstance(exc, ApiError):
        return error_response(exc.status, exc.message)
    if isinstance(exc, CapsaError):
        log.warning("request failed: %s", exc)
        return error_response(500, exc.message)
    log.exception("request failed")
    return error_response(500, f"internal error: {type(exc).__name__}")
