"""``capsa mcp``: the sandboxes of ``capsa serve`` as Model Context Protocol tools over stdio.

One face more on the same machinery: sandboxes come from the server's :class:`Registry` (templates,
warm pools, lifetimes, network policies), commands run through its envd ``ProcessTable``, files go
through its ``Filesystem`` and code through its persistent ``Interpreter``. Built with the official
``mcp`` SDK (2.x, ``MCPServer``); needs the ``server`` extra.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated, Any

import anyio
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CallToolResult, ContentBlock, ImageContent, TextContent

from capsa.errors import CapsaError
from capsa.server.entry import DEFAULT_TIMEOUT, INTERPRETER_TEMPLATE, Entry
from capsa.server.envd import processes_for, resolve_guest_path, stream_process
from capsa.server.filesystem import Filesystem
from capsa.server.interpreter import interpreter_for
from capsa.server.network import check_network, e2b_policy
from capsa.server.registry import Registry

log = logging.getLogger(__name__)

OUTPUT_LIMIT = 1 << 20  # bytes of stdout/stderr (and of a file read) returned to the model
IMAGES_LIMIT = 8 << 20  # base64 bytes of run_code's images returned to the model
COMMAND_TIMEOUT = 60
CODE_TIMEOUT = 300
MAX_COMMAND_TIMEOUT = 3600
_CLOSE_TIMEOUT = 60.0

INSTRUCTIONS = (
    "Run untrusted code in capsa sandboxes (Linux microVMs). Call create_sandbox first and pass its "
    "sandbox_id to the other tools; a sandbox ends after its timeout (seconds, default 300) or on "
    "kill_sandbox. Templates: 'base', and 'code-interpreter-v1' (run_code answers without Python "
    "start-up). Sandboxes have no network unless create_sandbox is given allow_internet_access or "
    "allow_out."
)


@dataclass
class McpConfig:
    pools: dict[str, int] = field(default_factory=dict)
    max_sandboxes: int | None = None
    max_timeout: int | None = None  # seconds; None: no cap
    memory_mb: int = 512
    dns_servers: tuple[str, ...] = ()
    allow_internal_destinations: bool = False


def _fail(exc: CapsaError) -> ToolError:
    return ToolError(exc.message + (f" (hint: {exc.hint})" if exc.hint else ""))


def _clip(data: bytes, truncated: bool = False) -> str:
    text = data[:OUTPUT_LIMIT].decode("utf-8", errors="replace")
    if truncated or len(data) > OUTPUT_LIMIT:
        text += f"\n[capsa: output truncated at {OUTPUT_LIMIT} bytes]"
    return text


class _Kept:
    """Text kept up to :data:`OUTPUT_LIMIT` bytes; the rest is counted, not held."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0
        self.truncated = False

    def add(self, text: object) -> None:
        data = str(text).encode()
        room = OUTPUT_LIMIT - self.size
        if len(data) > room:
            self.truncated = True
            data = data[: max(room, 0)]
        self.parts.append(data)
        self.size += len(data)

    def text(self) -> str:
        return _clip(b"".join(self.parts), self.truncated)


class SandboxTools:
    """The tools, as plain async methods over a :class:`Registry` (so tests and other faces can
    call them without MCP)."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def _entry(self, sandbox_id: str) -> Entry:
        try:
            return self.registry.get(sandbox_id)
        except CapsaError as exc:
            raise _fail(exc) from None

    async def create_sandbox(
        self,
        template: str = "base",
        *,
        timeout: int = DEFAULT_TIMEOUT,
        envs: dict[str, str] | None = None,
        metadata: dict[str, str] | None = None,
        allow_internet_access: bool | None = None,
        allow_out: list[str] | None = None,
        deny_out: list[str] | None = None,
    ) -> dict[str, Any]:
        """Create a sandbox and return its sandbox_id. timeout: seconds it lives.
        Network: none by default; allow_internet_access=True for all of it, or allow_out (domains
        like 'pypi.org' or '*.example.com', IPs, CIDRs) with deny_out=['0.0.0.0/0'] for an
        allowlist (allow_out wins over deny_out)."""
        try:
            network = None
            if allow_out is not None or deny_out is not None:
                network = {"allow_out": allow_out or [], "deny_out": deny_out or []}
            check_network(allow_internet_access, network)  # the policy: once a slot is taken
            entry = await self.registry.create(
                template,
                timeout=self.registry.check_timeout(timeout),
                metadata=metadata,
                envs=envs,
                make_policy=lambda: e2b_policy(allow_internet_access, network),
            )
            if template == INTERPRETER_TEMPLATE:
                await interpreter_for(entry).warm()
        except CapsaError as exc:
            raise _fail(exc) from None
        return {
            "sandbox_id": entry.id,
            "template": entry.template,
            "end_at": entry.end_at.isoformat(),
        }

    async def list_sandboxes(self) -> list[dict[str, Any]]:
        """The sandboxes running now, with their template, metadata and end time."""
        return [
            {
                "sandbox_id": e.id,
                "template": e.template,
                "metadata": e.metadata,
                "end_at": e.end_at.isoformat(),
            }
            for e in self.registry.list()
            if e.running
        ]

    async def run_command(
        self,
        sandbox_id: str,
        command: str,
        cwd: str | None = None,
        envs: dict[str, str] | None = None,
        timeout: int = COMMAND_TIMEOUT,
    ) -> dict[str, Any]:
        """Run a shell command (bash -l -c) in the sandbox and wait for it; returns exit_code,
        stdout and stderr (each cut at 1 MiB). timeout: seconds before the command is killed."""
        entry = self._entry(sandbox_id)
        if not 0 < timeout <= MAX_COMMAND_TIMEOUT:
            raise ToolError(f"timeout must be seconds from 1 to {MAX_COMMAND_TIMEOUT}")
        config: dict[str, Any] = {"cmd": "/bin/bash", "args": ["-l", "-c", command]}
        if cwd:
            config["cwd"] = cwd
        if envs:
            config["envs"] = envs
        table = processes_for(entry)
        out = {"stdout": bytearray(), "stderr": bytearray()}
        end: dict[str, Any] = {}
        try:
            proc = await table.start({"process": config})
            events = stream_process(
                proc, first={}, deadline=float(timeout), on_timeout=proc.process.kill
            )
            await anext(events)  # subscribed: the output pump may start
            table.run(proc, float(timeout))
            async for event in events:
                body = event["event"]
                for name, chunk in (body.get("data") or {}).items():
                    if len(out[name]) <= OUTPUT_LIMIT:
                        out[name] += base64.b64decode(chunk)
                end = body.get("end") or end
        except CapsaError as exc:
            raise _fail(exc) from None
        return {
            "exit_code": end.get("exitCode", -1),
            "stdout": _clip(bytes(out["stdout"])),
            "stderr": _clip(bytes(out["stderr"])),
            "status": end.get("status", "unknown"),
        }

    async def run_code(
        self, sandbox_id: str, code: str, context_id: str | None = None, timeout: int = CODE_TIMEOUT
    ) -> Annotated[CallToolResult, dict[str, Any]]:
        """Run Python code in the sandbox's persistent interpreter: variables stay between calls.
        Returns the last expression's value as text, stdout, stderr, an error (name, value,
        traceback) if the code raised, and PNG images (matplotlib figures, values with
        _repr_png_) as image content. Output is cut at 1 MiB per stream. timeout: seconds (1 to
        3600) before the interpreter is restarted (its variables are then lost)."""
        entry = self._entry(sandbox_id)
        if not 0 < timeout <= MAX_COMMAND_TIMEOUT:
            raise ToolError(f"timeout must be seconds from 1 to {MAX_COMMAND_TIMEOUT}")
        stdout, stderr = _Kept(), _Kept()
        result: str | None = None
        error: dict[str, str] | None = None
        images: list[str] = []
        images_size = 0
        interpreter = interpreter_for(entry)
        try:
            async with asyncio.timeout(timeout):
                async for event in interpreter.execute(code, context_id, None):
                    kind = event.get("type")
                    if kind == "stdout":
                        stdout.add(event.get("text", ""))
                    elif kind == "stderr":
                        stderr.add(event.get("text", ""))
                    elif kind == "result":
                        text = event.get("text")
                        if event.get("is_main_result") and text is not None:
                            result = _clip(str(text).encode())
                        png = event.get("png")
                        if isinstance(png, str) and images_size + len(png) <= IMAGES_LIMIT:
                            images.append(png)
                            images_size += len(png)
                    elif kind == "error":
                        error = {
                            k: _clip(str(event.get(k, "")).encode())
                            for k in ("name", "value", "traceback")
                        }
        except TimeoutError:
            await interpreter.stop()  # the cell may never end: only a new interpreter is usable
            raise ToolError(
                f"the code ran longer than {timeout}s; the interpreter was restarted "
                "(its variables are lost)"
            ) from None
        except CapsaError as exc:
            raise _fail(exc) from None
        summary = {
            "text": result,
            "stdout": stdout.text(),
            "stderr": stderr.text(),
            "error": error,
            "images": len(images),
        }
        content: list[ContentBlock] = [TextContent(type="text", text=json.dumps(summary, indent=2))]
        content += [ImageContent(type="image", data=png, mime_type="image/png") for png in images]
        return CallToolResult(content=content, structured_content=summary)

    async def read_file(self, sandbox_id: str, path: str) -> str:
        """The text of a file in the sandbox (UTF-8, invalid bytes replaced; cut at 1 MiB).
        Relative paths are relative to /home/user."""
        entry = self._entry(sandbox_id)
        try:
            head, more = await Filesystem(entry.vm).read_head(resolve_guest_path(path), OUTPUT_LIMIT)
        except CapsaError as exc:
            raise _fail(exc) from None
        return _clip(head, more)

    async def write_file(self, sandbox_id: str, path: str, content: str) -> dict[str, Any]:
        """Write text to a file in the sandbox (parent directories are created)."""
        entry = self._entry(sandbox_id)
        try:
            return await Filesystem(entry.vm).write(resolve_guest_path(path), content.encode())
        except CapsaError as exc:
            raise _fail(exc) from None

    async def list_files(
        self, sandbox_id: str, path: str = "/home/user", depth: int = 1
    ) -> list[dict[str, Any]]:
        """The entries of a directory in the sandbox (name, path, type, size), recursing depth
        levels."""
        entry = self._entry(sandbox_id)
        try:
            reply = await Filesystem(entry.vm).call("ListDir", {"path": path, "depth": depth})
        except CapsaError as exc:
            raise _fail(exc) from None
        return [
            {
                "name": e["name"],
                "path": e["path"],
                "type": e["type"].removeprefix("FILE_TYPE_").lower(),
                "size": int(e["size"]),
            }
            for e in reply["entries"]
        ]

    async def kill_sandbox(self, sandbox_id: str) -> str:
        """Stop a sandbox and delete it."""
        try:
            await self.registry.kill(sandbox_id)
        except CapsaError as exc:
            raise _fail(exc) from None
        return f"sandbox {sandbox_id} killed"


TOOLS = (
    "create_sandbox",
    "list_sandboxes",
    "run_command",
    "run_code",
    "read_file",
    "write_file",
    "list_files",
    "kill_sandbox",
)


async def _stop(registry: Registry) -> None:
    """Kill every sandbox (once), shielded from cancellation and bounded in time."""
    if registry.closed:
        return
    with anyio.CancelScope(shield=True), anyio.move_on_after(_CLOSE_TIMEOUT):
        log.info("capsa mcp stopping: killing %d sandboxes", len(registry))
        await registry.close()


def build(config: McpConfig) -> tuple[MCPServer[None], Registry]:
    registry = Registry(
        memory_mb=config.memory_mb,
        pools=config.pools,
        max_sandboxes=config.max_sandboxes,
        max_timeout=config.max_timeout,
        dns_servers=config.dns_servers,
        allow_internal_destinations=config.allow_internal_destinations,
    )

    @contextlib.asynccontextmanager
    async def lifespan(server: MCPServer[None]) -> AsyncIterator[None]:
        await registry.start()
        log.info("capsa mcp ready")
        try:
            yield
        finally:
            await _stop(registry)

    server: MCPServer[None] = MCPServer(
        "capsa", instructions=INSTRUCTIONS, lifespan=lifespan, log_level="WARNING"
    )
    tools = SandboxTools(registry)
    for name in TOOLS:
        server.add_tool(getattr(tools, name), name=name)
    return server, registry


async def serve_stdio(config: McpConfig) -> None:
    """Serve until stdin closes (the sandboxes are killed, then this returns) or SIGTERM/SIGINT
    (the sandboxes are killed, then the process exits: the SDK reads stdin in a worker thread that
    only a closed stdin would end)."""
    server, registry = build(config)
    async with anyio.create_task_group() as group:

        async def on_signals() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    log.info("capsa mcp: signal %d, stopping", signum)
                    await _stop(registry)
                    logging.shutdown()
                    os._exit(0)

        group.start_soon(on_signals)
        await server.run_stdio_async()
        group.cancel_scope.cancel()
