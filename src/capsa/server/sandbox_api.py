"""What the SDKs reach through a sandbox's URL: envd (port 49983: Connect services, ``/files``,
``/health``) and the code interpreter (port 49999: ``/execute``, ``/contexts``)."""

from __future__ import annotations

import datetime
import json
import logging
import secrets
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from capsa.server import connect
from capsa.server.connect import ConnectError
from capsa.server.envd import Filesystem, guest_path, processes_for, stream_process
from capsa.server.interpreter import InterpreterError, interpreter_for
from capsa.server.metrics import Metrics
from capsa.server.registry import ApiError, Entry, Registry
from capsa.server.watch import watchers_for

log = logging.getLogger(__name__)

ENVD_PORT = "49983"
INTERPRETER_PORT = "49999"


def _connect_error_response(error: ConnectError, streaming: bool) -> Response:
    if streaming:
        return Response(connect.end_stream(error), media_type=connect.STREAM_TYPE)
    return JSONResponse(error.to_json(), status_code=error.status)


def _envd_error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"code": status, "message": message}, status_code=status)


class SandboxApi:
    def __init__(self, registry: Registry, metrics: Metrics) -> None:
        self.registry = registry
        self.metrics = metrics

    def _entry(self, request: Request, *, interpreter: bool = False) -> Entry | None:
        try:
            entry = self.registry.get(request.headers.get("e2b-sandbox-id", ""))
        except ApiError:
            return None
        return entry

    def _authorized(self, request: Request, entry: Entry, *, interpreter: bool = False) -> bool:
        tokens = [request.headers.get("x-access-token")]
        if interpreter:
            tokens.append(request.headers.get("e2b-traffic-access-token"))
        return any(t is not None and secrets.compare_digest(t, entry.token) for t in tokens)

    async def __call__(self, request: Request) -> Response:
        port = request.headers.get("e2b-sandbox-port", ENVD_PORT)
        entry = self._entry(request)
        path = request.url.path
        if port == INTERPRETER_PORT:
            if entry is None:
                return _envd_error(502, "sandbox not found or not running")
            if not self._authorized(request, entry, interpreter=True):
                return _envd_error(401, "invalid access token")
            return await self._interpreter(request, entry)
        if port != ENVD_PORT:
            return _envd_error(502, f"port {port} is not served")
        streaming = request.headers.get("content-type", "").startswith(connect.STREAM_TYPE)
        is_rpc = path.startswith(("/process.Process/", "/filesystem.Filesystem/"))
        if entry is None:
            if is_rpc:
                return _connect_error_response(
                    ConnectError("unavailable", "sandbox not found or not running"), streaming
                )
            return _envd_error(502, "sandbox not found or not running")
        if not self._authorized(request, entry):
            if is_rpc:
                return _connect_error_response(
                    ConnectError("unauthenticated", "invalid access token"), streaming
                )
            return _envd_error(401, "invalid access token")
        if path == "/health":
            return Response(status_code=204)
        if path == "/files":
            return await self._files(request, entry)
        if is_rpc:
            return await self._rpc(request, entry, streaming)
        return _envd_error(404, f"no route {path}")

    # -- Connect RPCs --

    async def _rpc(self, request: Request, entry: Entry, streaming: bool) -> Response:
        service, _, method = request.url.path.strip("/").partition("/")
        try:
            raw = await request.body()
            messages = connect.parse_envelopes(raw) if streaming else [connect.parse_message(raw)]
            if len(messages) != 1:
                raise ConnectError("invalid_argument", "expected exactly one request message")
            message = messages[0]
            if streaming:
                events = await self._stream(service, method, message, entry, request)
                return StreamingResponse(_frames(events), media_type=connect.STREAM_TYPE)
            return JSONResponse(await self._unary(service, method, message, entry))
        except ConnectError as exc:
            return _connect_error_response(exc, streaming)
        except Exception as exc:
            log.exception("%s/%s failed", service, method)
            return _connect_error_response(ConnectError("internal", str(exc)), streaming)

    async def _unary(
        self, service: str, method: str, message: dict[str, Any], entry: Entry
    ) -> dict[str, Any]:
        if service == "filesystem.Filesystem":
            if method in ("CreateWatcher", "GetWatcherEvents", "RemoveWatcher"):
                return await watchers_for(entry).call(method, message)
            return await Filesystem(entry.vm).call(method, message)
        table = processes_for(entry)
        if method == "List":
            return {"processes": table.list()}
        if method == "SendSignal":
            await table.signal(message)
            return {}
        if method == "SendInput":
            await table.send_input(message)
            return {}
        if method == "CloseStdin":
            await table.close_stdin(message)
            return {}
        raise ConnectError("unimplemented", f"{service}/{method} is not implemented")

    async def _stream(
        self, service: str, method: str, message: dict[str, Any], entry: Entry, request: Request
    ) -> AsyncIterator[dict[str, Any]]:
        if service == "filesystem.Filesystem" and method == "WatchDir":
            path, recursive = guest_path(message.get("path")), bool(message.get("recursive"))
            watcher = await watchers_for(entry).open(path, recursive)
            deadline = connect.timeout_seconds(request.headers.get("connect-timeout-ms"))
            return watcher.stream(deadline)
        if service != "process.Process" or method not in ("Start", "Connect"):
            raise ConnectError("unimplemented", f"{service}/{method} is not implemented")
        table = processes_for(entry)
        deadline = connect.timeout_seconds(request.headers.get("connect-timeout-ms"))
        if method == "Start":
            proc = await table.start(message)
            self.metrics.execs.inc()
            events = stream_process(
                proc,
                first={"start": {"pid": proc.process.pid}},
                deadline=deadline,
                on_timeout=proc.process.kill,
            )
            first = await anext(events)  # subscribes before the output pump starts
            table.run(proc, deadline)
        else:
            proc = table.find(message.get("process"))

            async def no_kill() -> None:
                return None

            events = stream_process(
                proc, first={"start": {"pid": proc.process.pid}}, deadline=deadline, on_timeout=no_kill
            )
            first = await anext(events)
        return _prepend(first, events)

    # -- /files --

    async def _files(self, request: Request, entry: Entry) -> Response:
        fs = Filesystem(entry.vm)
        try:
            if request.method == "GET":
                path = guest_path(request.query_params.get("path"))
                data = await fs.read(path)
                return Response(data, media_type="application/octet-stream")
            if request.method != "POST":
                return _envd_error(405, "method not allowed")
            written = []
            if request.headers.get("content-type", "").startswith("multipart/form-data"):
                async with request.form(max_files=10000, max_part_size=1 << 30) as form:
                    for _, part in form.multi_items():
                        if isinstance(part, str):
                            continue
                        name = part.filename or request.query_params.get("path")
                        data = await part.read()
                        written.append(await fs.write(guest_path(name), data))
            else:
                path = guest_path(request.query_params.get("path"))
                written.append(await fs.write(path, await request.body()))
            return JSONResponse(written)
        except ConnectError as exc:
            return _envd_error(exc.status, exc.message)

    # -- code interpreter --

    async def _interpreter(self, request: Request, entry: Entry) -> Response:
        interp = interpreter_for(entry)
        path = request.url.path.rstrip("/")
        try:
            if path == "/execute" and request.method == "POST":
                body = json.loads(await request.body() or b"{}")
                code = body.get("code")
                if not isinstance(code, str):
                    return _envd_error(400, "code must be a string")
                if body.get("language") not in (None, "python"):
                    return _envd_error(400, f"language {body['language']!r} is not supported")
                self.metrics.code_runs.inc()
                events = interp.execute(code, body.get("context_id"), body.get("env_vars"))
                first = await anext(events, None)
                return StreamingResponse(_lines(first, events), media_type="application/x-ndjson")
            if path == "/contexts" and request.method == "POST":
                body = json.loads(await request.body() or b"{}")
                ctx = await interp.create_context(body.get("cwd"), body.get("language"))
                return JSONResponse(ctx)
            if path == "/contexts" and request.method == "GET":
                return JSONResponse(list(interp.contexts.values()))
            parts = path.split("/")
            if len(parts) >= 3 and parts[1] == "contexts":
                if len(parts) == 3 and request.method == "DELETE":
                    await interp.remove_context(parts[2])
                    return Response(status_code=204)
                if len(parts) == 4 and parts[3] == "restart" and request.method == "POST":
                    await interp.restart_context(parts[2])
                    return Response(status_code=204)
        except InterpreterError as exc:
            status = 404 if "not found" in exc.message else 500
            return _envd_error(status, exc.message)
        return _envd_error(404, f"no route {path}")


async def _prepend(
    first: dict[str, Any], rest: AsyncIterator[dict[str, Any]]
) -> AsyncIterator[dict[str, Any]]:
    yield first
    async for item in rest:
        yield item


async def _frames(events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    try:
        async for event in events:
            yield connect.envelope(event)
    except ConnectError as exc:
        yield connect.end_stream(exc)
        return
    except Exception as exc:
        log.exception("stream failed")
        yield connect.end_stream(ConnectError("internal", str(exc)))
        return
    yield connect.end_stream()


async def _lines(
    first: dict[str, Any] | None, events: AsyncIterator[dict[str, Any]]
) -> AsyncIterator[bytes]:
    if first is None:
        return
    yield json.dumps(first).encode() + b"\n"
    try:
        async for event in events:
            yield json.dumps(event).encode() + b"\n"
    except InterpreterError as exc:
        stamp = datetime.datetime.now(datetime.UTC).isoformat()
        error = {"type": "error", "name": "InterpreterError", "value": exc.message, "traceback": ""}
        log.warning("interpreter failed at %s: %s", stamp, exc.message)
        yield json.dumps(error).encode() + b"\n"
