"""``capsa mcp`` through the official ``mcp`` SDK's own stdio client, with real guests."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

mcp = pytest.importorskip("mcp")

from mcp import ClientSession, StdioServerParameters, stdio_client  # noqa: E402

from capsa._paths import runtime_base  # noqa: E402
from tests.server.conftest import REPO  # noqa: E402
from tests.server.test_server_lifecycle import _qemu_pids  # noqa: E402

pytestmark = [pytest.mark.vm, pytest.mark.timeout(240)]


def _params(*args: str, env: dict[str, str] | None = None) -> StdioServerParameters:
    return StdioServerParameters(
        command=sys.executable,
        args=["-m", "capsa.cli", "mcp", "--memory", "320", *args],
        env={**os.environ, **(env or {})},
        cwd=str(REPO),
    )


PNG_BYTES = b"\x89PNG\r\n\x1a\n" + b"not really an image"
PNG_VALUE = f"""
class Picture:
    def _repr_png_(self):
        return {PNG_BYTES!r}
Picture()
"""


@contextlib.asynccontextmanager
async def _session(log: Path, *args: str, env: dict[str, str]) -> AsyncIterator[ClientSession]:
    with log.open("w") as errlog:
        async with (
            stdio_client(_params(*args, env=env), errlog=errlog) as (read, write),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            yield session


async def _call(session: ClientSession, tool: str, **arguments: Any) -> Any:
    result = await session.call_tool(tool, arguments, read_timeout_seconds=120)
    text = "".join(block.text for block in result.content if block.type == "text")
    if result.is_error:
        return {"error": text}
    if result.structured_content is not None:
        content = result.structured_content
        return content.get("result", content) if set(content) == {"result"} else content
    return json.loads(text) if text[:1] in "{[" else text


@pytest.mark.anyio
async def test_mcp_tools_through_the_sdk_client(tmp_path: Path) -> None:
    token = uuid.uuid4().hex
    mark = f"CAPSA_TEST_MCP_MARK={token}".encode()
    log = tmp_path / "mcp.log"
    async with _session(log, "--pool", "base=1", env={"CAPSA_TEST_MCP_MARK": token}) as session:
        names = {tool.name for tool in (await session.list_tools()).tools}
        assert {
            "create_sandbox",
            "run_command",
            "run_code",
            "read_file",
            "write_file",
            "list_files",
            "kill_sandbox",
        } <= names

        created = await _call(session, "create_sandbox", envs={"FROM_MCP": "yes"})
        sid = created["sandbox_id"]
        assert created["template"] == "base"

        ran = await _call(session, "run_command", sandbox_id=sid, command="echo $FROM_MCP")
        assert ran["exit_code"] == 0
        assert ran["stdout"] == "yes\n"
        failed = await _call(session, "run_command", sandbox_id=sid, command="echo oops >&2; exit 3")
        assert (failed["exit_code"], failed["stderr"]) == (3, "oops\n")
        slow = await _call(session, "run_command", sandbox_id=sid, command="sleep 30", timeout=1)
        assert "timed out" in slow["error"]

        written = await _call(session, "write_file", sandbox_id=sid, path="notes/a.txt", content="héllo")
        assert written["path"] == "/home/user/notes/a.txt"
        text = await _call(session, "read_file", sandbox_id=sid, path="/home/user/notes/a.txt")
        assert text == "héllo"
        listed = await _call(session, "list_files", sandbox_id=sid, path="/home/user/notes")
        assert [(e["name"], e["type"], e["size"]) for e in listed] == [
            ("a.txt", "file", len("héllo".encode()))
        ]
        missing = await _call(session, "read_file", sandbox_id=sid, path="/nope")
        assert "not found" in missing["error"]

        assert (await _call(session, "run_code", sandbox_id=sid, code="x = 41"))["error"] is None
        code = await _call(session, "run_code", sandbox_id=sid, code="print('hi')\nx + 1")
        assert (code["text"], code["stdout"]) == ("42", "hi\n")
        boom = await _call(session, "run_code", sandbox_id=sid, code="1 / 0")
        assert boom["error"]["name"] == "ZeroDivisionError"
        assert "Traceback" in boom["error"]["traceback"]
        # a value with a PNG form (as a matplotlib figure has) comes back as image content
        shown = await session.call_tool(
            "run_code", {"sandbox_id": sid, "code": PNG_VALUE}, read_timeout_seconds=120
        )
        assert shown.structured_content is not None
        assert shown.structured_content["images"] == 1
        images = [block for block in shown.content if block.type == "image"]
        assert [image.mime_type for image in images] == ["image/png"]
        assert base64.b64decode(images[0].data) == PNG_BYTES

        listed_sbx = await _call(session, "list_sandboxes")
        assert [s["sandbox_id"] for s in listed_sbx] == [sid]
        assert "killed" in await _call(session, "kill_sandbox", sandbox_id=sid)
        gone = await _call(session, "run_command", sandbox_id=sid, command="true")
        assert "not found" in gone["error"]
        unknown = await _call(session, "create_sandbox", template="no-such-template")
        assert "not found" in unknown["error"]

        # one left running: closing the client's stdin must kill it
        await _call(session, "create_sandbox", timeout=600)
        assert _qemu_pids(mark)
    assert not _qemu_pids(mark), log.read_text()[-3000:]


def _mcp_server_pid(mark: bytes) -> int:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
                environ = (entry / "environ").read_bytes()
            except OSError:
                continue
            if b"capsa.cli\0mcp" in cmdline and mark in environ:
                return int(entry.name)
    raise AssertionError("no capsa mcp process found")


@pytest.mark.anyio
async def test_mcp_sigterm_kills_its_sandboxes(tmp_path: Path) -> None:
    token = uuid.uuid4().hex
    mark = f"CAPSA_TEST_MCP_MARK={token}".encode()
    log = tmp_path / "mcp.log"
    async with _session(log, env={"CAPSA_TEST_MCP_MARK": token}) as session:
        await _call(session, "create_sandbox", timeout=600)
        assert _qemu_pids(mark)
        pid = _mcp_server_pid(mark)
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while os.path.exists(f"/proc/{pid}/cmdline") and time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if (Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0]) == "Z":
                    break
            await anyio.sleep(0.1)
        assert not _qemu_pids(mark), log.read_text()[-3000:]
    assert "capsa mcp stopping" in log.read_text()
    assert not [p.name for p in runtime_base().iterdir() if p.name.startswith(f"capsa-{pid}-")]
