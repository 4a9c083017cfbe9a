"""Sandbox test bodies written once and run twice: on a local sandbox (test_cases_local.py) and on a
sandbox placed through capsa.ray (netns_suite.py). Each takes the sandbox handle and uses only the
public agent API, so the Ray handle must behave exactly like a local one."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

import capsa

Case = Callable[[Any], Awaitable[None]]


async def exec_output_exit_code_env_and_cwd(sbx: Any) -> None:
    agent = sbx.agent
    r = (
        await agent.exec("sh")
        .args(["-c", "echo $X; pwd; echo oops >&2; exit 3"])
        .env("X", "1")
        .cwd("/tmp")
        .run()
    )
    assert (r.exit_code, r.stdout, r.stderr) == (3, "1\n/tmp\n", "oops\n")
    fed = await agent.exec("cat").stdin(b"data").timeout(5).run()
    assert (fed.exit_code, fed.stdout_bytes) == (0, b"data")
    killed = await agent.exec("sh").args(["-c", "kill -KILL $$"]).run()
    assert (killed.exit_code, killed.signal) == (128 + 9, 9)
    assert (await agent.exec("echo").args(["$HOME", "a b"]).run()).stdout == "$HOME a b\n"


async def binary_output_is_exact(sbx: Any) -> None:
    script = "import sys; sys.stdout.buffer.write(bytes(range(256)) * 1024)"
    r = await sbx.agent.exec("python3").args(["-c", script]).run()
    assert r.stdout_bytes == bytes(range(256)) * 1024


async def spawn_streams_while_running(sbx: Any) -> None:
    script = "for i in 1 2 3; do echo $i; sleep 0.5; done"
    p = await sbx.agent.exec("sh").args(["-c", script]).spawn()
    arrivals: list[tuple[bytes, float]] = []
    started = time.monotonic()
    async for chunk in p.stdout:
        arrivals.append((chunk, time.monotonic() - started))
    assert b"".join(c for c, _ in arrivals) == b"1\n2\n3\n"
    assert arrivals[0][1] < 0.5 < arrivals[-1][1]  # the first line came before the command ended
    assert await p.wait(timeout=10) == 0
    assert p.returncode == 0


async def stdin_pipe_and_kill(sbx: Any) -> None:
    p = await sbx.agent.exec("cat").spawn()
    await p.write_stdin(b"hello ")
    await p.write_stdin(b"world")
    await p.close_stdin()
    assert await p.stdout.read() == b"hello world"
    assert await p.wait(timeout=10) == 0
    sleeper = await sbx.agent.exec("sleep").arg("30").spawn()
    await sleeper.kill()
    assert await sleeper.wait(timeout=10) == 128 + 9


async def unread_output_holds_the_process_back(sbx: Any) -> None:
    """Back-pressure end to end: after one chunk nobody reads, 48 MiB of output cannot be written
    (through Ray too: the streaming generator must not drain the process into the object store;
    the agent's window is 8 MiB, capsa.ray's 8 chunks)."""
    p = await sbx.agent.exec("head").args(["-c", str(48 << 20), "/dev/zero"]).spawn()
    chunks = p.stdout.__aiter__()
    assert await chunks.__anext__()
    with pytest.raises(capsa.CapsaTimeoutError):
        await p.wait(timeout=4)
    await p.kill()
    async for _ in chunks:  # what was in flight (a process whose output nobody reads cannot end)
        pass
    assert await p.wait(timeout=10) == 128 + 9


async def exec_timeout_keeps_partial_output(sbx: Any) -> None:
    with pytest.raises(capsa.ExecTimeoutError) as caught:
        await sbx.agent.exec("sh").args(["-c", "echo early; sleep 30"]).timeout(1).run()
    assert caught.value.stdout == b"early\n" and caught.value.argv[0] == "sh"


async def files_round_trip(sbx: Any) -> None:
    agent = sbx.agent
    data = bytes(range(256)) * 4096 + b"tail"  # 1 MiB + 4: several chunks
    await agent.mkdir("/tmp/cases/sub", parents=True)
    await agent.write_file("/tmp/cases/sub/blob", data, mode=0o600)
    assert await agent.read_file("/tmp/cases/sub/blob") == data
    stat = await agent.stat("/tmp/cases/sub/blob")
    assert (stat.type, stat.size, stat.mode & 0o777) == ("file", len(data), 0o600)
    assert [e.name for e in await agent.list_dir("/tmp/cases/sub")] == ["blob"]
    assert await agent.exists("/tmp/cases/sub/blob")
    await agent.remove("/tmp/cases", recursive=True)
    assert not await agent.exists("/tmp/cases")


async def file_errors_keep_their_class_and_data(sbx: Any) -> None:
    with pytest.raises(capsa.GuestFileNotFoundError) as caught:
        await sbx.agent.read_file("/no/such/file")
    assert caught.value.path == "/no/such/file"
    with pytest.raises(capsa.GuestFileNotFoundError) as missing:
        await sbx.agent.exec("no-such-program").run()
    assert missing.value.hint  # the hint travels with the error


async def info_and_state(sbx: Any) -> None:
    info = await sbx.agent.info()
    assert info.cpus >= 1 and info.memory_bytes > 100 << 20 and info.hostname.startswith("capsa-")
    assert sbx.status is capsa.RunState.RUNNING
    assert sbx.accelerator in ("kvm", "tcg") and isinstance(sbx.pid, int)


CASES: list[Case] = [
    exec_output_exit_code_env_and_cwd,
    binary_output_is_exact,
    spawn_streams_while_running,
    stdin_pipe_and_kill,
    unread_output_holds_the_process_back,
    exec_timeout_keeps_partial_output,
    files_round_trip,
    file_errors_keep_their_class_and_data,
    info_and_state,
]
IDS = [case.__name__ for case in CASES]
