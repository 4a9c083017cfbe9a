"""Attacks on ``capsa mcp``'s tools that make the host hold a guest's data without bound: a huge file
read for a 1 MiB answer, a cell that prints without end, a cell that never returns. The tools are
called directly (:class:`SandboxTools` over a real :class:`Registry` and a real guest)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("mcp")

from mcp.server.mcpserver.exceptions import ToolError

from capsa.server.mcp import OUTPUT_LIMIT, SandboxTools
from capsa.server.registry import Registry

pytestmark = [pytest.mark.vm, pytest.mark.timeout(240)]


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def _peak_growth(call: Callable[[], Awaitable[Any]]) -> tuple[Any, int]:
    """``call()``'s result and how far this process's RSS rose above its start meanwhile."""
    before = _rss()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            peak[0] = max(peak[0], _rss())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = await call()
    finally:
        done.set()
        sampler.join(5)
    return result, max(peak[0], _rss()) - before


def test_mcp_tools_bound_what_they_hold() -> None:
    """Memory and time exhaustion through MCP: read_file of a 300 MiB file loaded it whole before
    cutting to 1 MiB; run_code kept every output chunk of a cell printing 40 MiB; a cell that
    sleeps for ever blocked the tool (and the interpreter) with no timeout."""

    async def scenario() -> None:
        registry = Registry(memory_mb=256)
        await registry.start()
        try:
            tools = SandboxTools(registry)
            sandbox_id = (await tools.create_sandbox("base", timeout=600))["sandbox_id"]
            made = await tools.run_command(sandbox_id, "truncate -s 300M /tmp/big && echo ok")
            assert made["stdout"].strip() == "ok", made

            text, grown = await _peak_growth(lambda: tools.read_file(sandbox_id, "/tmp/big"))
            assert text.startswith("\0" * 1000) and "truncated" in text[OUTPUT_LIMIT:]
            assert grown < 64 << 20, f"read_file grew RSS by {grown >> 20} MiB"

            code = "import sys\nfor _ in range(40): sys.stdout.write('x' * (1 << 20))"
            result, grown = await _peak_growth(lambda: tools.run_code(sandbox_id, code))
            out = result.structured_content["stdout"]
            assert out.startswith("x" * 1000) and "truncated" in out[OUTPUT_LIMIT:]
            assert grown < 64 << 20, f"run_code grew RSS by {grown >> 20} MiB"

            started = time.monotonic()
            with pytest.raises(ToolError, match="longer than 3s"):
                await tools.run_code(sandbox_id, "import time\ntime.sleep(3600)", timeout=3)
            assert time.monotonic() - started < 30
            after = await tools.run_code(sandbox_id, "6 * 7")
            assert after.structured_content["text"] == "42"
        finally:
            await registry.close()

    asyncio.run(scenario())
