"""Blocking faces of the agent API (``vm.agent`` of a :class:`capsa.sync.SyncSandbox`), derived
from :class:`capsa.Agent` and its exec builders and processes (see :mod:`capsa.sync._derive`)."""

from __future__ import annotations

from collections.abc import Iterator

from capsa._portal import Portal
from capsa.agent.client import Agent
from capsa.agent.exec import ExecBuilder, OutputStream, Process
from capsa.sync._derive import Face
from capsa.sync._signatures import (
    SyncAgentMethods,
    SyncExecBuilderMethods,
    SyncOutputStreamMethods,
    SyncProcessMethods,
)


async def _next_chunk(stream: OutputStream) -> bytes | None:
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return None


class SyncOutputStream(Face, SyncOutputStreamMethods, twin=OutputStream):
    """``for chunk in proc.stdout`` yields bytes as the guest produces them."""

    _target: OutputStream

    def __iter__(self) -> Iterator[bytes]:
        while (chunk := self._call(_next_chunk(self._target))) is not None:
            yield chunk


class SyncProcess(Face, SyncProcessMethods, twin=Process):
    """Blocking face of :class:`capsa.agent.exec.Process` (a command started with ``spawn()``)."""

    _target: Process

    def __init__(self, portal: Portal | None, process: Process) -> None:
        super().__init__(portal, process)
        self.pid = process.pid
        self.argv = process.argv
        self.stdout = SyncOutputStream(portal, process.stdout)
        self.stderr = SyncOutputStream(portal, process.stderr)

    @property
    def returncode(self) -> int | None:
        return self._target.returncode

    @property
    def signal(self) -> int | None:
        return self._target.signal


class SyncExecBuilder(Face, SyncExecBuilderMethods["SyncExecBuilder", SyncProcess], twin=ExecBuilder):
    """Blocking face of :class:`capsa.agent.exec.ExecBuilder` (same immutable chaining)."""

    _plain_in_caller = True


_AGENT_PLUMBING = {
    "channel": "the host end of the wire",
    "open_connection": "its asyncio streams live on the sandbox's event loop; use the async API",
}


class SyncAgent(Face, SyncAgentMethods[SyncExecBuilder, SyncProcess], twin=Agent, skip=_AGENT_PLUMBING):
    """Blocking face of :class:`capsa.Agent`."""
