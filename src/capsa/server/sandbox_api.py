"""What the SDKs reach through a sandbox's URL: envd (port 49983: Connect services, ``/files``,
``/health``) and the code interpreter (port 49999: ``/execute``, ``/contexts``)."""

from __future__ import annotations

import datetime
import json
import logging
import secrets
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from capsa.errors import CapsaError
from capsa.server import accounts, connect
from capsa.server.connect import ConnectError
from capsa.server.content_encoding import accepts_gzip, gzip_chunks
from capsa.server.entry import ApiError, Entry
from capsa.server.envd import keepalive_interval, processes_for, resolve_guest_path, stream_process
from capsa.server.filesystem import Filesystem, upload_metadata
from capsa.server.interpreter import InterpreterError, interpreter_for
from capsa.server.limits import Limits, RequestRejected
from capsa.server.metrics import Metrics
from capsa.server.redact import client_message
from capsa.server.registry import Registry
from capsa.server.signed_urls import signed_sandbox
from capsa.server.uploads import MultipartFiles, gunzip
from capsa.server.watch import watchers_for

log = logging.getLogger(__name__)

ENVD_PORT = "49983"
INTERPRETER_PORT = "49999"


def _connect_error_response(error: ConnectError, streaming: bool) -> Response:
    if streaming:
        return Response(connect.end_stream(error), media_type=connect.STREAM_TYPE)
    return JSONResponse(error.to_json(), status_code=error.status)


HEALTH_TIMEOUT = 10.0  # seconds the guest agent has to answer a health probe


async def _health(entry: Entry) -> Response:
    """envd's ``/health`` is answered inside the VM: here the guest agent answers a ping, so a
    wedged or overloaded guest reads as not running (``is_running()`` is false on a 502)."""
    try:
        await entry.vm.agent.ping(timeout=HEALTH_TIMEOUT)
    except CapsaError as exc:
        log.info("sandbox %s: health probe unanswered: %s", entry.id, exc.message)
        return _envd_error(502, f"the sandbox's guest did not answer: {exc.message}")
    return Response(status_code=204)


def _envd_error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"code": status, "message": message}, status_code=status)


MAX_UPLOAD_FILES = 1000  # file parts in one multipart upload
# As the proxy in front of E2B's envd words it: the SDK reads "was not found" as "the sandbox is
# gone" (a health probe after a dropped stream then reports it killed, not unreachable).
NOT_FOUND = "the sandbox was not found: it is not running"


class SandboxApi:
    def __init__(self, registry: Registry, metrics: Metrics, limits: Limits | None = None) -> None:
        self.registry = registry
        self.metrics = metrics
        self.limits = limits or Limits()

    def _entry(self, request: Request, *, interpreter: bool = False) -> Entry | None:
        """The sandbox the request is for, running or paused (:meth:`_awake` after the token)."""
        try:
            entry = self.registry.find(request.headers.get("e2b-sandbox-id", ""))
        except ApiError:
            return None
        return entry

    async def _awake(
        self, entry: Entry, *, rpc: bool = False, streaming: bool = False
    ) -> Entry | Response:
        """The entry running (a paused one with auto_resume is resumed: the caller has shown its
        token), or the answer why not: a paused one's (502, "... was not found ...", as the proxy
        in front of E2B's envd words it), or 429 when no slot is free to resume it."""
        try:
            return await self.registry.awake(entry.id)
        except ApiError as exc:
            full = exc.status == 429
            message = exc.message if exc.status != 404 else NOT_FOUND
            if rpc:
                error = ConnectError("resource_exhausted" if full else "unavailable", message)
                return _connect_error_response(error, streaming)
            return _envd_error(429 if full else 502, message)

    def _authorized(self, request: Request, entry: Entry, *, interpreter: bool = False) -> bool:
        # the interpreter's port is a sandbox port: its traffic token (derived from the envd token,
        # not equal to it) opens it too; the JS SDK's context calls send only that one
        pairs = [(request.headers.get("x-access-token"), entry.token)]
        if interpreter:
            pairs.append((request.headers.get("e2b-traffic-access-token"), entry.traffic_token))
        # bytes: compare_digest refuses non-ASCII str (a 500 before); the headers are latin-1
        return any(
            t is not None and secrets.compare_digest(t.encode("latin-1"), want.encode())
            for t, want in pairs
        )

    async def __call__(self, request: Request) -> Response:
        port = request.headers.get("e2b-sandbox-port", ENVD_PORT)
        entry = self._entry(request)
        path = request.url.path
        if port == INTERPRETER_PORT:
            if entry is None:
                return _envd_error(502, NOT_FOUND)
            if not self._authorized(request, entry, interpreter=True):
                return _envd_error(401, "invalid access token")
            awake = await self._awake(entry)
            if not isinstance(awake, Entry):
                return awake
            return await self._interpreter(request, awake)
        if port != ENVD_PORT:
            return _envd_error(502, f"port {port} is not served")
        streaming = request.headers.get("content-type", "").startswith(connect.STREAM_TYPE)
        is_rpc = path.startswith(("/process.Process/", "/filesystem.Filesystem/"))
        if "e2b-sandbox-id" not in request.headers and path == "/files":  # a signed URL
            try:
                query = request.scope["query_string"]
                entry = signed_sandbox(self.registry.list(), request.method, query)
            except ApiError as exc:
                return _envd_error(exc.status, exc.message)
            return await self._signed_files(request, entry)
        if entry is None:
            if is_rpc:
                return _connect_error_response(ConnectError("unavailable", NOT_FOUND), streaming)
            return _envd_error(502, NOT_FOUND)
        if not self._authorized(request, entry):
            if is_rpc:
                return _connect_error_response(
                    ConnectError("unauthenticated", "invalid access token"), streaming
                )
            return _envd_error(401, "invalid access token")
        awake = await self._awake(entry, rpc=is_rpc, streaming=streaming)
        if not isinstance(awake, Entry):
            return awake
        entry = awake
        if path == "/health":
            return await _health(entry)
        if path == "/files":
            return await self._files(request, entry)
        if is_rpc:
            return await self._rpc(request, entry, streaming)
        return _envd_error(404, f"no route {path}")

    async def _signed_files(self, request: Request, entry: Entry) -> Response:
        """A ``/files`` request authorized by its signature (the signer holds the token)."""
        awake = await self._awake(entry)
        if not isinstance(awake, Entry):
            return awake
        return await self._files(request, awake)

    # -- Connect RPCs --

    async def _rpc(self, request: Request, entry: Entry, streaming: bool) -> Response:
        service, _, method = request.url.path.strip("/").partition("/")
        if streaming and service == "process.Process" and method == "StreamInput":
            return await self._stream_input(request, entry)
        try:
            raw = await request.body()
            messages = connect.parse_envelopes(raw) if streaming else [connect.parse_message(raw)]
            if len(messages) != 1:
                raise ConnectError("invalid_argument", "expected exactly one request message")
            message = messages[0]
            user = accounts.from_authorization(request.headers.get("authorization"))
            if streaming:
                events = await self._stream(service, method, message, entry, request, user=user)
                return StreamingResponse(_frames(events), media_type=connect.STREAM_TYPE)
            return JSONResponse(await self._unary(service, method, message, entry, user))
        except ConnectError as exc:
            return _connect_error_response(exc, streaming)
        except RequestRejected:
            raise  # answered by the app (413/408) before any Connect framing
        except Exception as exc:
            log.exception("%s/%s failed", service, method)
            return _connect_error_response(ConnectError("internal", client_message(exc)), streaming)

    async def _stream_input(self, request: Request, entry: Entry) -> Response:
        """The client-streaming ``StreamInput`` (the SDKs' ``commands.stream_input`` and
        ``pty.stream_input``): input is written to the process as each message arrives; the
        reply, one empty message, comes at the end of the request body (or an error at the
        first bad message: the rest of the body is not read, and the connection is closed)."""
        table = processes_for(entry, self.limits)
        try:
            await table.stream_input(connect.read_envelopes(request.stream()))
            body = connect.envelope({}) + connect.end_stream()
        except ConnectError as exc:
            body = connect.end_stream(exc)
        except RequestRejected:
            raise  # answered by the app (413/408)
        except Exception as exc:
            log.exception("process.Process/StreamInput failed")
            body = connect.end_stream(ConnectError("internal", client_message(exc)))
        return Response(body, media_type=connect.STREAM_TYPE)

    async def _unary(
        self, service: str, method: str, message: dict[str, Any], entry: Entry, user: str | None
    ) -> dict[str, Any]:
        if service == "filesystem.Filesystem":
            if method in ("CreateWatcher", "GetWatcherEvents", "RemoveWatcher"):
                return await watchers_for(entry).call(method, message)
            return await Filesystem(entry.vm, user).call(method, message)
        table = processes_for(entry, self.limits)
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
        if method == "Update":
            await table.update(message)
            return {}
        raise ConnectError("unimplemented", f"{service}/{method} is not implemented")

    async def _stream(
        self,
        service: str,
        method: str,
        message: dict[str, Any],
        entry: Entry,
        request: Request,
        *,
        user: str | None,
    ) -> AsyncIterator[dict[str, Any]]:
        if service == "filesystem.Filesystem" and method == "WatchDir":
            path = resolve_guest_path(message.get("path"), accounts.home_of(user))
            recursive = bool(message.get("recursive"))
            include_entry = bool(message.get("includeEntry"))
            watcher = await watchers_for(entry).open(path, recursive, include_entry)
            deadline = connect.timeout_seconds(request.headers.get("connect-timeout-ms"))
            return watcher.stream(deadline)
        if service != "process.Process" or method not in ("Start", "Connect"):
            raise ConnectError("unimplemented", f"{service}/{method} is not implemented")
        table = processes_for(entry, self.limits)
        deadline = connect.timeout_seconds(request.headers.get("connect-timeout-ms"))
        keepalive = keepalive_interval(request.headers.get("keepalive-ping-interval"))
        if method == "Start":
            proc = await table.start(message, user)
            self.metrics.execs.inc()
            events = stream_process(
                proc,
                first={"start": {"pid": proc.process.pid}},
                deadline=deadline,
                on_timeout=proc.process.kill,
                keepalive=keepalive,
            )
            first = await anext(events)  # subscribes before the output pump starts
            table.run(proc, deadline)
        else:
            proc = table.find(message.get("process"))

            async def no_kill() -> None:
                return None

            events = stream_process(
                proc,
                first={"start": {"pid": proc.process.pid}},
                deadline=deadline,
                on_timeout=no_kill,
                keepalive=keepalive,
            )
            first = await anext(events)
        return _prepend(first, events)

    # -- /files --

    async def _files(self, request: Request, entry: Entry) -> Response:
        """Downloads stream from the guest as the client reads them; uploads stream to the guest
        as the client sends them (multipart parts parsed on the fly), within the upload cap."""
        try:
            fs = Filesystem(entry.vm, accounts.from_query(request.query_params.get("username")))
            if request.method == "GET":
                path = fs.path(request.query_params.get("path"))
                chunks = fs.read_chunks(path, self.limits.max_upload_bytes)
                first = await anext(chunks, b"")  # a missing file is an error, not a 200
                download: AsyncIterator[bytes] = _prepend_bytes(first, chunks)
                headers = {}
                if accepts_gzip(request.headers.get("accept-encoding")):
                    download, headers = gzip_chunks(download), {"content-encoding": "gzip"}
                return StreamingResponse(
                    download, media_type="application/octet-stream", headers=headers
                )
            if request.method != "POST":
                return _envd_error(405, "method not allowed")
            written = []
            content_type = request.headers.get("content-type", "")
            metadata = upload_metadata(request.headers)
            encoding = request.headers.get("content-encoding", "identity").strip().lower()
            if encoding not in ("identity", "gzip"):
                return _envd_error(415, f"Content-Encoding {encoding!r:.40} is not supported")
            body: AsyncIterator[bytes] = request.stream()
            if encoding == "gzip":  # the SDKs' files.write(..., gzip=True)
                body = gunzip(body, self.limits.max_upload_bytes)
            if content_type.startswith("multipart/form-data"):
                parts = MultipartFiles(body, content_type, MAX_UPLOAD_FILES)
                async for name, part in parts:
                    target = fs.path(name or request.query_params.get("path"))
                    written.append(await fs.write(target, part, metadata))
            else:
                path = fs.path(request.query_params.get("path"))
                written.append(await fs.write(path, body, metadata))
            return JSONResponse(written)
        except ConnectError as exc:
            return _envd_error(exc.status, exc.message)

    # -- code interpreter --

    async def _interpreter(self, request: Request, entry: Entry) -> Response:
        interp = interpreter_for(entry)
        path = request.url.path.rstrip("/")
        try:
            if path == "/execute" and request.method == "POST":
                body = await _json_object(request)
                code, context, env = body.get("code"), body.get("context_id"), body.get("env_vars")
                if not isinstance(code, str):
                    return _envd_error(400, "code must be a string")
                if body.get("language") not in (None, "python"):
                    return _envd_error(400, f"language {body['language']!r:.40} is not supported")
                if context is not None and not isinstance(context, str):
                    return _envd_error(400, "context_id must be a string")
                if env is not None and not _is_str_map(env):
                    return _envd_error(400, "env_vars must map strings to strings")
                if (context or "default") not in interp.contexts:
                    return _envd_error(404, f"context {context!r} not found")
                self.metrics.code_runs.inc()
                # the headers go out now, not with the first output: the JS SDK's runCode
                # timeoutMs only starts counting once they have arrived
                events = interp.execute(code, context, env)
                return StreamingResponse(_lines(events), media_type="application/x-ndjson")
            if path == "/contexts" and request.method == "POST":
                body = await _json_object(request)
                cwd, language = body.get("cwd"), body.get("language")
                if not all(v is None or isinstance(v, str) for v in (cwd, language)):
                    return _envd_error(400, "cwd and language must be strings")
                ctx = await interp.create_context(cwd, language)
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
        except ApiError as exc:
            if isinstance(exc, RequestRejected):
                raise
            return _envd_error(exc.status, exc.message)
        except InterpreterError as exc:
            status = 404 if "not found" in exc.message else 500
            return _envd_error(status, exc.message)
        return _envd_error(404, f"no route {path}")


async def _json_object(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        value = json.loads(raw or b"{}")
    except (ValueError, RecursionError):  # RecursionError: nesting too deep
        raise ApiError(400, "the request body is not JSON") from None
    if not isinstance(value, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return value


def _is_str_map(value: object) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    )


async def _prepend_bytes(first: bytes, rest: AsyncGenerator[bytes, None]) -> AsyncIterator[bytes]:
    try:
        if first:
            yield first
        async for chunk in rest:
            yield chunk
    finally:
        await rest.aclose()  # a client that went away cancels the guest read now


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
        yield connect.end_stream(ConnectError("internal", client_message(exc)))
        return
    yield connect.end_stream()


async def _lines(events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    try:
        async for event in events:
            yield json.dumps(event).encode() + b"\n"
    except InterpreterError as exc:
        stamp = datetime.datetime.now(datetime.UTC).isoformat()
        error = {"type": "error", "name": "InterpreterError", "value": exc.message, "traceback": ""}
        log.warning("interpreter failed at %s: %s", stamp, exc.message)
        yield json.dumps(error).encode() + b"\n"
