"""E2B's fork and snapshot calls: ``POST /sandboxes/{id}/fork``, ``POST /sandboxes/{id}/snapshots``,
``GET /snapshots``, ``DELETE /templates/{id}`` (the SDK's ``delete_snapshot``) and the creation of
a sandbox from a snapshot (``Sandbox.create(snapshot_id)``).

A fork saves its parent once and restores each fork from that save; each fork takes its own slot
(:class:`~capsa.server.quota.Quota`) and succeeds or fails alone, reported in its entry of the
reply as E2B does. The parent keeps its id, token and end. A snapshot is saved beside the
sandbox, belongs to its tenant, and outlives the sandbox."""

from __future__ import annotations

import asyncio
import datetime
import logging
import re
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from capsa.errors import CapsaError
from capsa.runtime import new_vm_dir
from capsa.server.carry import Carried, carry_over
from capsa.server.entry import TEMPLATES, ApiError, Entry, check_timeout, named_image
from capsa.server.exposure import is_public, mask_host, set_mask_host, set_public
from capsa.server.listing import NEXT_TOKEN, page
from capsa.server.quota import LimitReached
from capsa.server.registry import Registry
from capsa.server.snapshots import Saved
from capsa.server.tenants import Principal

log = logging.getLogger(__name__)

MAX_FORKS = 20  # per request, as in E2B
FORK_TIMEOUT = 15  # seconds: E2B's default lifetime of a fork
_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")


def _error_json(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, ApiError):
        return {"code": exc.status, "message": exc.message}
    if isinstance(exc, CapsaError):
        return {"code": 500, "message": exc.message}
    return {"code": 500, "message": f"internal error: {type(exc).__name__}"}


def _count(value: object) -> int:
    if value is None:
        return 1
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_FORKS:
        raise ApiError(400, f"count must be from 1 to {MAX_FORKS}, got {value!r:.20}")
    return value


def _name(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ApiError(400, f"snapshot name must match {_NAME.pattern}, got {value!r:.80}")
    if value in TEMPLATES or named_image(value) is not None:
        raise ApiError(409, f"{value!r} is a template's name", hint="name the snapshot otherwise")
    return value


class SnapshotApi:
    """The routes. The control plane passes its helpers: the JSON of a new sandbox, the
    caller's :class:`Principal`, and the request's JSON body."""

    def __init__(
        self,
        registry: Registry,
        sandbox_json: Callable[[Entry], dict[str, Any]],
        principal: Callable[[Request], Principal],
        body: Callable[[Request], Awaitable[dict[str, Any]]],
    ) -> None:
        self.registry = registry
        self._sandbox_json = sandbox_json
        self._principal = principal
        self._json = body

    def routes(self) -> list[Route]:
        return [
            Route("/sandboxes/{sandbox_id}/fork", self.fork, methods=["POST"]),
            Route("/sandboxes/{sandbox_id}/snapshots", self.create_snapshot, methods=["POST"]),
            Route("/snapshots", self.list_snapshots, methods=["GET"]),
            Route("/templates/{template_id:path}", self.delete_template, methods=["DELETE"]),
        ]

    def _live(self, request: Request, action: str) -> Entry:
        entry = self.registry.find(request.path_params["sandbox_id"], self._principal(request).scope)
        if entry.paused is not None:
            raise ApiError(
                409, f"cannot {action} sandbox {entry.id!r}: it is paused", hint="resume it first"
            )
        return entry

    async def fork(self, request: Request) -> Response:
        body = await self._json(request)
        count = _count(body.get("count"))
        timeout = check_timeout(body.get("timeout", FORK_TIMEOUT))
        parent = self._live(request, "fork")
        tenant = self._principal(request).tenant
        slots = _reserve(self.registry, tenant, count)  # before the save: a full server saves nothing
        held = sum(1 for slot in slots if slot is None)
        if not held:
            raise slots[0] or ApiError(429, "no slot")
        scratch: Path | None = None
        try:
            scratch = new_vm_dir("serve-fork-")  # RAM-backed when it can, and guarded: as vm.fork's
            carried = await self.registry.save(parent, scratch / "snapshot")
        except BaseException:
            for _ in range(held):  # no restore took them over
                self.registry.quota.release(tenant)
            if scratch is not None:
                await asyncio.to_thread(shutil.rmtree, scratch, True)
            raise
        try:  # from here each restore owns its slot (and gives it back if it fails)
            results = await asyncio.gather(
                *(
                    self._fork_one(parent, carried, scratch / "snapshot", timeout, tenant)
                    for _ in range(held)
                ),
                return_exceptions=True,
            )
        finally:
            await asyncio.to_thread(shutil.rmtree, scratch, True)
        made = iter(results)
        reply: list[dict[str, Any]] = []
        for slot in slots:
            outcome: BaseException | Entry = slot if slot is not None else next(made)
            if isinstance(outcome, Entry):
                reply.append({"sandbox": self._sandbox_json(outcome)})
            else:
                if not isinstance(outcome, ApiError):
                    log.warning("fork of sandbox %s failed: %r", parent.id, outcome)
                reply.append({"error": _error_json(outcome)})
        log.info(
            "sandbox %s forked: %d of %d started", parent.id, len(results) - _failed(results), count
        )
        return JSONResponse(reply, status_code=201)

    async def _fork_one(
        self, parent: Entry, carried: Carried, snapshot: Path, timeout: int, tenant: str
    ) -> Entry:
        child = await self.registry.restore(
            snapshot,
            template=parent.template,
            timeout=timeout,
            tenant=tenant,
            metadata=parent.metadata,
            envs=parent.envs,
            policy=parent.policy,
            reserved=True,
            secret_names=parent.secret_names,
            transforms=parent.transforms,
        )
        set_public(child, is_public(parent))  # before any await: a private parent's clones are private
        set_mask_host(child, mask_host(parent))
        await carry_over(carried, child)  # the parent's commands and interpreter, copied with its guest
        return child

    async def create_snapshot(self, request: Request) -> Response:
        body = await self._json(request)
        name = _name(body.get("name"))
        memory = body.get("memory")  # false: mode="filesystem", the files alone
        memory = True if memory is None else memory
        if not isinstance(memory, bool):
            raise ApiError(400, "memory must be a boolean")
        source = self._live(request, "snapshot")
        tenant = self._principal(request).tenant  # the caller's, as a created sandbox is
        store = self.registry.snapshots
        with store.reserving(tenant) as fits:
            if not fits:
                raise ApiError(
                    429,
                    f"tenant {tenant!r} may keep at most {store.max_per_tenant} snapshots",
                    hint="delete snapshots you no longer need (Sandbox.delete_snapshot)",
                )
            raw, target = store.new_path()
            try:
                carried = await self.registry.save(source, target, memory=memory)
            except BaseException:
                await asyncio.to_thread(shutil.rmtree, target, True)
                raise
            saved = Saved(
                id=raw,
                name=name,
                tenant=tenant,
                template=source.template,
                source_id=source.id,
                path=target,
                envs=dict(source.envs),
                created_at=datetime.datetime.now(datetime.UTC),
                policy=source.policy,
                secret_names=source.secret_names,
                transforms=source.transforms,
                public_traffic=is_public(source),
                carried=carried if memory else None,  # a new boot has no processes to take up
                mask_request_host=mask_host(source),
            )
            store.add(saved)
        return JSONResponse(saved.json(), status_code=201)

    async def list_snapshots(self, request: Request) -> Response:
        query = request.query_params
        saved = self.registry.snapshots.list(
            self._principal(request).scope, query.get("sandboxID"), query.get("name")
        )
        chosen, token = page(saved, lambda s: f"{s.created_at.isoformat()}|{s.id}", query)
        headers = {NEXT_TOKEN: token} if token else None
        return JSONResponse([s.json() for s in chosen], headers=headers)

    async def delete_template(self, request: Request) -> Response:
        ref = request.path_params["template_id"]
        if self.registry.snapshots.delete(ref, self._principal(request).scope):
            return Response(status_code=204)
        if ref in TEMPLATES or named_image(ref) is not None:
            raise ApiError(
                501,
                "deleting templates is not supported by capsa serve",
                hint="remove named images with `capsa image rm` on the server",
            )
        raise ApiError(404, f"snapshot {ref!r} not found")


async def create_from_snapshot(
    registry: Registry,
    saved: Saved,
    *,
    timeout: int,
    metadata: dict[str, str],
    envs: dict[str, str],
    tenant: str,
) -> Entry:
    """``Sandbox.create(snapshot_id)``: a sandbox restored from ``saved``, with the saved
    sandbox's environment under ``envs`` and its network policy (a snapshot's devices are fixed:
    a restore cannot add or drop its network interface)."""
    with registry.snapshots.using(saved) as path:
        entry = await registry.restore(
            path,
            template=saved.template,
            timeout=timeout,
            tenant=tenant,
            metadata=metadata,
            envs={**saved.envs, **envs},
            policy=saved.policy,
            secret_names=saved.secret_names,
            transforms=saved.transforms,
        )
    set_public(entry, saved.public_traffic)  # before any await: the source's ingress access
    set_mask_host(entry, saved.mask_request_host)
    if saved.carried is not None:
        await carry_over(saved.carried, entry)  # the saved sandbox's commands and interpreter
    if entry.interpreter is not None and envs:
        await entry.interpreter.set_env(envs)  # this create's variables, as a fresh one would get
    return entry


def _reserve(registry: Registry, tenant: str, count: int) -> list[ApiError | None]:
    """Take up to ``count`` slots of ``tenant``, in one synchronous step; each entry is None (a slot
    is held for that fork) or the 429 that fork gets."""
    slots: list[ApiError | None] = []
    for _ in range(count):
        try:
            registry.quota.reserve(tenant)
            slots.append(None)
        except LimitReached as exc:
            slots.append(ApiError(429, exc.message, hint=exc.hint))
    return slots


def _failed(results: list[Entry | BaseException]) -> int:
    return sum(1 for r in results if not isinstance(r, Entry))
