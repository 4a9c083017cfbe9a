"""Guest files as streams of chunks, for callers that forward them rather than hold them: an HTTP
download sent as the guest reads it, an upload written as the client sends it, a preview that keeps
only a file's head.

The agent's credit windows make both directions flow-controlled: the guest sends at most a window
ahead of what :func:`read_chunks`' consumer took, and :func:`write_chunks` pulls its next chunk only
once the guest has room for it. These are functions over a local :class:`Agent` (not methods of it)
because a stream of chunks cannot cross the Ray proxy that mirrors the Agent's methods.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterable
from typing import Any

from capsa.agent import wire
from capsa.agent.channel import Call
from capsa.agent.client import Agent
from capsa.agent.errors import check_guest_path, check_mode, check_timeout, check_user, expect_ok
from capsa.errors import CapsaTimeoutError

IDLE_TIMEOUT = 60.0  # the longest wait for the guest's next chunk (not for the whole file)
WRITE_TIMEOUT = 3600.0


def _finish(call: Call) -> None:
    """Forget a streaming call; tell the guest to stop if it has not ended."""
    if not call.end.done() and call.channel.failure is None:
        with contextlib.suppress(Exception):
            call.channel.post({"t": "cancel", "id": call.id})
    call.close()


async def read_chunks(
    agent: Agent, path: str, *, idle_timeout: float = IDLE_TIMEOUT
) -> AsyncGenerator[bytes, None]:
    """A guest file's content as it arrives (chunks of up to 1 MiB). Errors such as a missing file
    raise on the first ``anext``; closing the iterator early cancels the read in the guest.
    ``idle_timeout`` bounds each wait for the guest, not the transfer: a slow consumer is not the
    guest's fault, and while it does not read, the guest is not sent credit to read further."""
    check_guest_path(path)
    check_timeout(idle_timeout)
    call = await agent.channel.call("read_file", {"path": path}, in_streams=("file",))
    try:
        try:
            async with asyncio.timeout(idle_timeout):
                expect_ok(await call.response, "read_file", path)
            stream = call.streams["file"]
            while True:
                async with asyncio.timeout(idle_timeout):
                    chunk = await stream.read()
                if chunk is None:
                    break
                yield chunk
        except TimeoutError:
            raise CapsaTimeoutError(f"read_file {path}: no data for {idle_timeout}s") from None
        if call.end.done():  # the guest failed mid-file (an I/O error) instead of ending it
            expect_ok(call.end.result(), "read_file", path)
    finally:
        _finish(call)


async def read_head(agent: Agent, path: str, limit: int) -> tuple[bytes, bool]:
    """At most ``limit`` bytes from the start of a guest file, and whether there was more: the
    rest is never transferred (the read is cancelled once the head is in)."""
    parts: list[bytes] = []
    size = 0
    chunks = read_chunks(agent, path)
    try:
        async for chunk in chunks:
            parts.append(chunk)
            size += len(chunk)
            if size > limit:
                return b"".join(parts)[:limit], True
    finally:
        await chunks.aclose()
    return b"".join(parts), False


async def write_chunks(
    agent: Agent,
    path: str,
    chunks: AsyncIterable[bytes],
    *,
    mode: int = 0o644,
    timeout: float = WRITE_TIMEOUT,
    user: str | None = None,
) -> None:
    """Create or replace a guest file with what ``chunks`` yields, pulling each chunk only once the
    guest has credit for it. Nothing is pulled before the guest accepted the path, so a caller may
    retry after an error such as a missing parent directory. ``user``: as ``Agent.write_file``."""
    check_guest_path(path)
    check_timeout(timeout)
    check_mode(mode)
    args: dict[str, Any] = {"path": path, "mode": mode}
    if user is not None:
        args["user"] = check_user(user)
    call = await agent.channel.call("write_file", args, out_streams=("file",))
    try:
        async with asyncio.timeout(timeout):
            expect_ok(await call.response, "write_file", path, user=user)
            credit = call.credits["file"]
            async for data in chunks:
                view = memoryview(data)
                for offset in range(0, len(view), wire.CHUNK):
                    chunk = bytes(view[offset : offset + wire.CHUNK])
                    if not await credit.take(wire.cost(len(chunk)), call.end.done):
                        break
                    await agent.channel.send({"t": "data", "id": call.id, "s": "file", "d": chunk})
                if call.end.done():
                    break
            if not call.end.done():
                await agent.channel.send({"t": "eof", "id": call.id, "s": "file"})
            expect_ok(await call.end, "write_file", path)
    except TimeoutError:
        raise CapsaTimeoutError(f"write_file {path} did not finish within {timeout}s") from None
    finally:
        _finish(call)
