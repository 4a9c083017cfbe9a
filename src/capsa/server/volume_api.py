"""E2B's Volume API: ``/volumes`` (create, list, get, destroy; API key, per tenant) and the content
API ``/volumecontent/{id}/...`` (stat, list, make dir, read, write, remove, change metadata),
authorized by the volume's own token (``Authorization: Bearer``) as E2B's SDKs send it.

Content calls run in a helper sandbox, or in the running sandbox that mounts the volume
(``capsa.server.volumes``): the server never parses a volume's filesystem, and paths are confined
to the volume (no ``..``, no symlink followed)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from capsa.errors import CapsaError
from capsa.sandbox.volume_files import MAX_FILE, VolumeFileError
from capsa.server.entry import ApiError
from capsa.server.tenants import Principal
from capsa.server.volumes import ServerVolumes, VolumeRecord

log = logging.getLogger(__name__)

_STATUS = {
    "not_found": 404,
    "exists": 409,
    "not_dir": 400,
    "is_dir": 400,
    "invalid": 400,
    "no_space": 507,
    "too_large": 413,
    "read_only": 409,
    "permission": 403,
    "not_empty": 409,
    "moved": 409,  # a sandbox mounting it no longer has it at its mount path
    "unavailable": 409,  # a sandbox mounting it cannot serve content calls (no python3)
}


def _volume_json(record: VolumeRecord, *, token: bool) -> dict[str, Any]:
    data: dict[str, Any] = {"volumeID": record.id, "name": record.name}
    if token:
        data["token"] = record.token
    return data


class VolumeApi:
    def __init__(self, volumes: ServerVolumes, principal_of: Callable[[Request], Principal]) -> None:
        self.volumes = volumes
        self._principal_of = principal_of

    def routes(self) -> list[Route]:
        return [
            Route("/volumes", self.create, methods=["POST"]),
            Route("/volumes", self.list, methods=["GET"]),
            Route("/volumes/{volume_id}", self.get, methods=["GET"]),
            Route("/volumes/{volume_id}", self.destroy, methods=["DELETE"]),
        ]

    def content_routes(self) -> list[Route]:
        return [
            Route("/volumecontent/{volume_id}/path", self.stat, methods=["GET"]),
            Route("/volumecontent/{volume_id}/path", self.remove, methods=["DELETE"]),
            Route("/volumecontent/{volume_id}/path", self.set_meta, methods=["PATCH"]),
            Route("/volumecontent/{volume_id}/dir", self.list_dir, methods=["GET"]),
            Route("/volumecontent/{volume_id}/dir", self.make_dir, methods=["POST"]),
            Route("/volumecontent/{volume_id}/file", self.read, methods=["GET"]),
            Route("/volumecontent/{volume_id}/file", self.write, methods=["PUT"]),
        ]

    # -- control plane --

    async def create(self, request: Request) -> Response:
        try:
            body = json.loads(await request.body() or b"{}")
        except ValueError:
            raise ApiError(400, "the body is not JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        record = self.volumes.create(self._principal_of(request).tenant, body.get("name"))
        return JSONResponse(_volume_json(record, token=True), status_code=201)

    async def list(self, request: Request) -> Response:
        records = self.volumes.in_scope(self._principal_of(request).scope)
        return JSONResponse(
            [_volume_json(r, token=False) for r in sorted(records, key=lambda r: r.name)]
        )

    async def get(self, request: Request) -> Response:
        record = self.volumes.find(request.path_params["volume_id"], self._principal_of(request).scope)
        return JSONResponse(_volume_json(record, token=True))

    async def destroy(self, request: Request) -> Response:
        record = self.volumes.find(request.path_params["volume_id"], self._principal_of(request).scope)
        await self.volumes.destroy(record)
        return Response(status_code=204)

    # -- content --

    def _record(self, request: Request) -> VolumeRecord:
        bearer = request.headers.get("authorization", "")
        token = bearer.removeprefix("Bearer ") if bearer.startswith("Bearer ") else None
        record = self.volumes.authorized(request.path_params["volume_id"], token)
        if record is None:  # an unknown id and a wrong token look the same
            raise ApiError(401, "invalid volume token")
        return record

    async def stat(self, request: Request) -> Response:
        record = self._record(request)
        async with self.volumes.files(record) as files:
            return JSONResponse(await _guarded(files.stat(_path(request))))

    async def remove(self, request: Request) -> Response:
        record = self._record(request)
        async with self.volumes.files(record) as files:
            await _guarded(files.remove(_path(request)))
        return Response(status_code=204)

    async def set_meta(self, request: Request) -> Response:
        record = self._record(request)
        try:
            body = json.loads(await request.body() or b"{}")
        except ValueError:
            raise ApiError(400, "the body is not JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        meta = {k: _int_or_none(body.get(k), k) for k in ("uid", "gid", "mode")}
        async with self.volumes.files(record) as files:
            return JSONResponse(await _guarded(files.set_meta(_path(request), **meta)))

    async def list_dir(self, request: Request) -> Response:
        record = self._record(request)
        depth = _int_or_none(request.query_params.get("depth"), "depth") or 1
        async with self.volumes.files(record) as files:
            return JSONResponse(await _guarded(files.list(_path(request), depth)))

    async def make_dir(self, request: Request) -> Response:
        record = self._record(request)
        meta = _meta_params(request)
        async with self.volumes.files(record) as files:
            entry = await _guarded(files.make_dir(_path(request), force=_force(request), **meta))
        return JSONResponse(entry, status_code=201)

    async def read(self, request: Request) -> Response:
        record = self._record(request)
        async with self.volumes.files(record) as files:
            data = await _guarded(files.read(_path(request)))
        return Response(data, media_type="application/octet-stream")

    async def write(self, request: Request) -> Response:
        record = self._record(request)
        path, meta, force = _path(request), _meta_params(request), _force(request)
        limit = min(MAX_FILE, record.volume.size_mb << 20)
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:  # never more than the volume could hold, nor than fits in memory
                raise ApiError(413, f"the file is larger than the volume ({limit} bytes)")
            chunks.append(chunk)
        async with self.volumes.files(record) as files:
            entry = await _guarded(files.write(path, b"".join(chunks), force=force, **meta))
        return JSONResponse(entry, status_code=201)


async def _guarded(call: Any) -> Any:
    try:
        return await call
    except VolumeFileError as exc:
        raise ApiError(_STATUS.get(exc.kind, 500), exc.message) from None
    except ApiError:
        raise
    except CapsaError as exc:
        raise ApiError(500, exc.message) from None


def _path(request: Request) -> str:
    path = request.query_params.get("path")
    if path is None or not path.startswith("/") or "\0" in path or len(path) > 4096:
        raise ApiError(400, "path must be an absolute path in the volume")
    return path


def _force(request: Request) -> bool:
    return request.query_params.get("force", "false").lower() == "true"


def _int_or_none(value: object, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise ApiError(400, f"{what} must be an integer")
    try:
        number = int(str(value))
    except ValueError:
        raise ApiError(400, f"{what} must be an integer") from None
    if not 0 <= number < 1 << 32:
        raise ApiError(400, f"{what} is out of range")
    return number


def _meta_params(request: Request) -> dict[str, int | None]:
    return {k: _int_or_none(request.query_params.get(k), k) for k in ("uid", "gid", "mode")}
