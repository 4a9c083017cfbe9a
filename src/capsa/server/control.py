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

from capsa.errors import CapacityError, CapsaError, ConfigError, VolumeError
from capsa.server.entry import (
    DEFAULT_TIMEOUT,
    ENVD_VERSION,
    INTERPRETER_TEMPLATE,
    TEMPLATES,
    ApiError,
    Entry,
    resolved,
)
from capsa.server.exposure import set_mask_host, set_public
from capsa.server.guest_metrics import MAX_BATCH, Sampler
from capsa.server.interpreter import interpreter_for
from capsa.server.listing import NEXT_TOKEN, descending, filter_sandboxes, page, sandbox_key
from capsa.server.metrics import Metrics
from capsa.server.network import (
    check_network,
    mask_request_host,
    public_traffic,
    update_policy,
)
from capsa.server.registry import Registry
from capsa.server.server_secrets import create_egress, live_headers, secrets_policy
from capsa.server.server_secrets import transforms as rule_secrets
from capsa.server.snapshot_api import SnapshotApi, create_from_snapshot
from capsa.server.tenants import Principal
from capsa.server.volumes import ServerVolumes
from capsa.shares.spec import check_mount_point
from capsa.volume.spec import MAX_VOLUMES

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
        "trafficAccessToken": entry.traffic_token,
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


def _unix_param(request: Request, name: str) -> int | None:
    value = request.query_params.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ApiError(400, f"{name} must be a unix timestamp in seconds") from None


def _memory(body: dict[str, Any], key: str) -> bool:
    """E2B's ``memory`` flags (unset: true): false asks for the files alone (a fresh boot)."""
    value = body.get(key)
    if value is None:
        return True
    if not isinstance(value, bool):
        raise ApiError(400, f"{key} must be a boolean")
    return value


def _lifecycle(body: dict[str, Any]) -> tuple[bool, bool, bool]:
    """``(auto_pause, auto_resume, pause_memory)`` of a create request: the SDKs send
    ``lifecycle`` as ``autoPause``, ``autoPauseMemory`` and ``autoResume: {"enabled": ...}``."""
    auto_pause = body.get("autoPause") or False
    if not isinstance(auto_pause, bool):
        raise ApiError(400, "autoPause must be a boolean")
    pause_memory = _memory(body, "autoPauseMemory")
    resume = body.get("autoResume")
    enabled = resume.get("enabled") if isinstance(resume, dict) else resume
    if enabled is None:
        enabled = False
    if not isinstance(enabled, bool):
        raise ApiError(400, 'autoResume must be an object {"enabled": boolean}')
    if enabled and not auto_pause:
        raise ApiError(400, "auto_resume needs on_timeout='pause'")
    if enabled and not pause_memory:  # as E2B: a new boot cannot answer the call that woke it
        raise ApiError(400, "auto_resume cannot be combined with a filesystem-only pause",
                       hint="resume it with Sandbox.connect(), or pause with mode='full'")  # fmt: skip
    return auto_pause, enabled, pause_memory


def _lifecycle_json(entry: Entry) -> dict[str, Any]:
    return {"onTimeout": "pause" if entry.auto_pause else "kill", "autoResume": entry.auto_resume}


class ControlPlane:
    def __init__(
        self,
        registry: Registry,
        metrics: Metrics,
        sampler: Sampler | None = None,
        *,
        domain: str = "localhost:3000",
        volumes: ServerVolumes | None = None,
    ) -> None:
        self.volumes = volumes
        self.domain = domain  # of the ingress hosts ({port}-{id}.{domain}), in create's reply
        self.registry = registry
        self.metrics = metrics
        self.sampler = sampler
        self.snapshots = SnapshotApi(registry, self.sandbox_json, principal_of, _body)

    def sandbox_json(self, entry: Entry) -> dict[str, Any]:
        """A created, connected or forked sandbox, with the domain of its ports (``get_host``)."""
        return {**sandbox_json(entry), "domain": self.domain}

    def routes(self) -> list[Route]:
        return [
            Route("/sandboxes", self.create, methods=["POST"]),
            Route("/v2/sandboxes", self.create, methods=["POST"]),
            Route("/sandboxes", self.list, methods=["GET"]),
            Route("/v2/sandboxes", self.list, methods=["GET"]),
            Route("/sandboxes/metrics", self.metrics_batch, methods=["GET"]),  # before {sandbox_id}
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
            Route("/sandboxes/{sandbox_id}/network", self.update_network, methods=["PUT"]),
        ]

    async def create(self, request: Request) -> Response:
        body = await _body(request)
        template = body.get("templateID") or "base"
        if not isinstance(template, str):
            raise ApiError(400, "templateID must be a string")
        timeout = self.registry.check_timeout(body.get("timeout", DEFAULT_TIMEOUT))
        auto_pause, auto_resume, pause_memory = _lifecycle(body)
        internet = body.get("allow_internet_access", body.get("allowInternetAccess"))
        network = body.get("network")
        check_network(internet, network)  # cheap; the policy is made once a slot is taken
        started = time.monotonic()
        metadata = _strings(body.get("metadata"), "metadata")
        envs = _strings(body.get("envVars"), "envVars")
        tenant = principal_of(request).tenant
        # checked now (400/403 before any slot is taken): the secrets and rules it gets
        egress = create_egress(self.registry.secrets, body, template, tenant, internet=internet)
        saved = (
            None if template in TEMPLATES else self.registry.snapshots.find(template, _scope(request))
        )
        if saved is not None:  # Sandbox.create(snapshot_id)
            if body.get("capsa_secrets"):
                raise ApiError(400, "a sandbox created from a snapshot keeps the snapshot's secrets",
                               hint="leave out capsa_secrets")  # fmt: skip
            if network:
                raise ApiError(
                    400,
                    "a sandbox created from a snapshot keeps the snapshot's network settings",
                    hint="leave out network, or create the source sandbox with the settings wanted",
                )
            entry = await create_from_snapshot(
                self.registry, saved, timeout=timeout, metadata=metadata, envs=envs, tenant=tenant
            )
        elif body.get("volumeMounts"):
            entry = await self._create_with_volumes(body["volumeMounts"], template, tenant, {
                "timeout": timeout, "metadata": metadata, "envs": envs, "tenant": tenant,
                "make_policy": egress.make_policy, "auto_pause": auto_pause, "auto_resume": auto_resume,
                "secret_names": egress.names, "transforms": egress.transforms,
            })  # fmt: skip
        else:
            entry = await self.registry.create(
                template,
                timeout=timeout,
                metadata=metadata,
                envs=envs,
                make_policy=egress.make_policy,
                tenant=tenant,
                auto_pause=auto_pause,
                auto_resume=auto_resume,
                pause_memory=pause_memory,
                secret_names=egress.names,
                transforms=egress.transforms,
            )
        public = saved.public_traffic if saved is not None else public_traffic(network)
        set_public(entry, public)  # before any await: no public moment
        mask = saved.mask_request_host if saved is not None else mask_request_host(network)
        set_mask_host(entry, mask)
        self.metrics.created(time.monotonic() - started, template)
        if template == INTERPRETER_TEMPLATE:
            await interpreter_for(entry).warm()
        return JSONResponse(self.sandbox_json(entry), status_code=201)

    async def _create_with_volumes(
        self, mounts: object, template: str, tenant: str, options: dict[str, Any]
    ) -> Entry:
        """``volumeMounts``: [{"name", "path"}], each volume of the caller's tenant."""
        if self.volumes is None:
            raise ApiError(501, "this server keeps no volumes")
        if not isinstance(mounts, list) or len(mounts) > MAX_VOLUMES:
            raise ApiError(400, f"volumeMounts must be a list of at most {MAX_VOLUMES} mounts")
        pairs = []
        for mount in mounts:
            if not isinstance(mount, dict):
                raise ApiError(400, "each volume mount is an object with name and path")
            record = self.volumes.find_by_name(tenant, mount.get("name"))
            try:
                path = check_mount_point(mount.get("path"))  # type: ignore[arg-type]
            except ConfigError as exc:
                raise ApiError(400, exc.message.replace("share:", "volume mount:")) from None
            pairs.append((record, path))
        if len({p for _, p in pairs}) != len(pairs) or len({r.id for r, _ in pairs}) != len(pairs):
            raise ApiError(400, "each volume and each mount path may appear once")
        async with self.volumes.mounting(pairs) as hold:
            try:
                entry = await self.registry.create(
                    template, volumes=tuple((r.volume, p) for r, p in pairs), **options
                )
            except VolumeError as exc:
                raise ApiError(409, exc.message, hint=exc.hint) from None
            hold(entry.id)
        return entry

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
        detail["lifecycle"] = _lifecycle_json(entry)
        if self.volumes is not None and (mounts := self.volumes.mounts_json(entry.id)):
            detail["volumeMounts"] = mounts
        return JSONResponse(detail)

    async def kill(self, request: Request) -> Response:
        await self.registry.kill(request.path_params["sandbox_id"], _scope(request))
        return Response(status_code=204)

    async def set_timeout(self, request: Request) -> Response:
        """E2B's ``set_timeout``: the sandbox ends (or with ``on_timeout="pause"`` pauses) that
        many seconds from now; 0 is now."""
        body = await _body(request)
        timeout = self.registry.check_timeout(body.get("timeout"), zero=True)
        entry = await self.registry.awake(request.path_params["sandbox_id"], _scope(request))
        if timeout == 0 and not entry.auto_pause:
            await self.registry.kill(entry.id, _scope(request))
            return Response(status_code=204)
        await entry.set_timeout(timeout)  # 0 with auto_pause: the reaper pauses it at once
        return Response(status_code=204)

    async def refresh(self, request: Request) -> Response:
        duration = (await _body(request)).get("duration")
        timeout = None if duration is None else self.registry.check_timeout(duration)
        entry = await self.registry.awake(request.path_params["sandbox_id"], _scope(request))
        if timeout is not None:
            await entry.set_timeout(timeout)
        return Response(status_code=204)

    async def metrics_of(self, request: Request) -> Response:
        """The sandbox's guest samples from ``start`` to ``end`` (unix seconds, both optional),
        oldest first; a paused sandbox's stop at its pause."""
        entry = self.registry.find(request.path_params["sandbox_id"], _scope(request))
        start, end = _unix_param(request, "start"), _unix_param(request, "end")
        if start is not None and end is not None and start > end:
            raise ApiError(400, "start must not be after end")
        samples = [] if self.sampler is None else self.sampler.series(entry.id, start, end)
        return JSONResponse([s.to_json() for s in samples])

    async def metrics_batch(self, request: Request) -> Response:
        """The latest sample of each sandbox in ``sandbox_ids`` (comma-separated): E2B's
        ``{"sandboxes": {id: metric}}``; ids unknown to the caller, or not sampled yet, are left
        out."""
        raw = request.query_params.getlist("sandbox_ids")
        ids = [i for value in raw for i in value.split(",") if i]
        if not ids:
            raise ApiError(400, "sandbox_ids is required")
        if len(ids) > MAX_BATCH:
            raise ApiError(400, f"at most {MAX_BATCH} sandbox_ids at a time")
        scope = _scope(request)
        visible = {e.id for e in self.registry.list(scope)}
        found: dict[str, Any] = {}
        for sandbox_id in ids:
            latest = None if self.sampler is None else self.sampler.latest(sandbox_id)
            if sandbox_id in visible and latest is not None:
                found[sandbox_id] = latest.to_json()
        return JSONResponse({"sandboxes": found})

    async def unsupported(self, request: Request) -> Response:
        self.registry.get(request.path_params["sandbox_id"], _scope(request))
        action = request.url.path.rsplit("/", 1)[-1]
        raise ApiError(501, f"{action} is not supported by capsa serve yet")

    async def update_network(self, request: Request) -> Response:
        """E2B's ``update_network``: the new egress policy and header rules replace the old ones at
        once (``vm.network.set_policy`` and ``set_header_secrets``: live connections the policy
        denies are reset); a paused sandbox gets them when it resumes. An omitted ``rules``
        clears the rules, as in E2B."""
        entry = self.registry.find(request.path_params["sandbox_id"], _scope(request))
        body = await _body(request)
        policy = update_policy(body)
        rules = rule_secrets(body)
        if entry.policy is None:
            raise ApiError(
                409,
                f"sandbox {entry.id!r} was created without network settings, so it has no network "
                "interface to update",
                hint="create it with allow_internet_access or network={...} to change them later",
            )
        if rules and entry.node_id is not None:
            raise ApiError(501, "network.rules are not supported by capsa serve --ray")
        secrets_policy(policy, rules, None)  # 400 for a rule whose host the new policy denies
        async with entry.resume_lock:  # not halfway through a pause or a resume
            if entry.closing:
                raise ApiError(404, f"sandbox {entry.id!r} not found")
            if entry.paused is None:
                network: Any = entry.vm.network  # a remote handle's set_policy is awaitable
                operator = self.registry.secrets.resolve(entry.secret_names)
                changed = bool(rules or entry.transforms)
                headers = live_headers(network, operator, rules, policy, changed=changed)
                await resolved(network.set_policy(policy))
                if headers is not None:
                    network.set_header_secrets(headers)
            entry.policy, entry.transforms = policy, rules
            if self.registry.journal is not None:
                self.registry.journal.changed(entry)
        return Response(status_code=204)

    async def pause(self, request: Request) -> Response:
        memory = _memory(await _body(request), "memory")  # false: mode="filesystem"
        await self.registry.pause(request.path_params["sandbox_id"], _scope(request), memory=memory)
        return Response(status_code=204)

    async def connect(self, request: Request) -> Response:
        """Connect to a sandbox; a paused one is resumed from its snapshot first."""
        body = await _body(request)
        timeout = body.get("timeout")
        entry = await self.registry.resume(
            request.path_params["sandbox_id"],
            None if timeout is None else self.registry.check_timeout(timeout),
            _scope(request),
            memory=_memory(body, "memory"),  # false: on_resume="reboot"
        )
        return JSONResponse(self.sandbox_json(entry), status_code=200)


def api_error(exc: Exception) -> JSONResponse:
    if isinstance(exc, ApiError):
        return error_response(exc.status, exc.message)
    if isinstance(exc, VolumeError):  # a volume in use (e.g. a fork of a sandbox mounting one)
        return error_response(409, exc.message)
    if isinstance(exc, CapacityError):  # admission control: the host is full, not broken
        log.warning("sandbox refused: %s", exc)
        hint = f" ({exc.hint})" if exc.hint else ""
        return error_response(503, f"{exc.message}{hint}")
    if isinstance(exc, CapsaError):
        log.warning("request failed: %s", exc)
        return error_response(500, exc.message)
    log.exception("request failed")
    return error_response(500, f"internal error: {type(exc).__name__}")
