"""Listing the guest's processes and attaching to them again (after a restore, a fork, a lost handle).

The listing comes from the guest, so it is checked like any other guest reply: a bounded number of
rows, each field of the right type and range, else :class:`ProtocolError`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from capsa.agent.channel import Channel
from capsa.agent.errors import agent_error, check_timeout, expect_ok
from capsa.agent.exec import Process
from capsa.agent.types import ProcessInfo
from capsa.errors import CapsaTimeoutError, ConfigError, ProtocolError

MAX_PROCESSES = 1000  # rows a listing may have (the guest sends at most this many)
MAX_WORDS = 64
MAX_WORD = 256
MAX_PID = 1 << 22  # Linux's PID_MAX_LIMIT


def _is_int(value: object, low: int, high: int) -> bool:
    return type(value) is int and low <= value <= high


def _argv(value: object) -> tuple[str, ...]:
    if not (
        isinstance(value, list)
        and len(value) <= MAX_WORDS
        and all(isinstance(word, str) and len(word) <= MAX_WORD for word in value)
    ):
        raise ProtocolError("the agent sent a malformed argv for a process")
    return tuple(value)


def parse_process(row: object) -> ProcessInfo:
    """One row of the guest's ``processes`` reply, validated."""
    if not isinstance(row, dict):
        raise ProtocolError("the agent sent a process entry that is not a map")
    pid: Any = row.get("pid")
    started: Any = row.get("started")
    code: Any = row.get("code")
    sig: Any = row.get("signal")
    flags = [row.get(key) for key in ("pty", "attached", "running")]
    if not _is_int(pid, 1, MAX_PID) or not all(isinstance(flag, bool) for flag in flags):
        raise ProtocolError(f"the agent sent a malformed process entry: {row!r:.200}")
    if type(started) not in (int, float) or not 0 <= started < 1e11:
        raise ProtocolError(f"the agent sent a malformed start time: {started!r:.40}")
    running = bool(row["running"])
    exit_code = signal = None
    if not running:
        if _is_int(sig, 1, 127) and code is None:
            signal, exit_code = sig, 128 + sig
        elif _is_int(code, 0, 255) and sig is None:
            exit_code = code
        else:
            raise ProtocolError(f"the agent sent a malformed exit status: {row!r:.200}")
    elif code is not None or sig is not None:
        raise ProtocolError("the agent sent an exit status for a running process")
    return ProcessInfo(
        pid=pid,
        argv=_argv(row.get("argv")),
        pty=bool(row["pty"]),
        started=float(started),
        attached=bool(row["attached"]),
        running=running,
        exit_code=exit_code,
        signal=signal,
    )


async def list_processes(channel: Channel, timeout: float) -> list[ProcessInfo]:
    check_timeout(timeout)
    reply = expect_ok(await channel.request("processes", {}, timeout), "processes")
    rows = reply.get("processes")
    if not isinstance(rows, list) or len(rows) > MAX_PROCESSES:
        raise ProtocolError("the agent's process listing is not a list of at most 1000 rows")
    return [parse_process(row) for row in rows]


async def attach_process(channel: Channel, pid: int, timeout: float) -> Process:
    """A :class:`Process` handle for guest process ``pid``: its kept output first, then live output;
    ``wait``, ``kill``, ``write_stdin`` work as for a spawned one."""
    if not _is_int(pid, 1, MAX_PID):
        raise ConfigError(f"a guest pid must be an integer from 1 to {MAX_PID}, got {pid!r:.40}")
    check_timeout(timeout)
    call = await channel.call(
        "attach", {"pid": pid}, in_streams=("stdout", "stderr"), out_streams=("stdin",)
    )
    try:
        async with asyncio.timeout(timeout):
            reply: dict[str, Any] = await call.response
    except TimeoutError:
        call.close()
        raise CapsaTimeoutError(f"the agent did not answer attach {pid} within {timeout}s") from None
    except BaseException:
        call.close()
        raise
    if not reply["ok"]:
        call.close()
        raise agent_error(reply.get("err"), f"attach to process {pid}")
    stdin = reply.get("stdin")
    if reply.get("pid") != pid or not isinstance(stdin, bool):
        call.close()
        raise ProtocolError(f"malformed attach reply from the agent: {reply!r:.200}")
    argv = _argv(reply.get("argv")) or (f"pid {pid}",)
    call.label = f"{argv[0]!r} (pid {pid})"
    return Process(call, argv, pid, stdin_open=stdin)


async def resync(channel: Channel, timeout: float) -> None:
    """First request to a guest restored from a snapshot (``channel`` made with ``sync=``): the
    guest detaches the processes of its old host and sends the marker this channel skips to."""
    token = channel.sync_token
    if token is None:
        raise ConfigError("resync needs a channel made with a sync token")
    expect_ok(await channel.request("resync", {"token": token}, timeout), "resync")
