"""Commands through the guest agent on a real sandbox: output, exit codes, stdin, env, cwd,
streaming, signals, timeouts and concurrency."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

import capsa

pytestmark = [pytest.mark.vm, pytest.mark.asyncio]


async def test_run_collects_output_exit_code_env_and_cwd(sandbox: capsa.Sandbox) -> None:
    agent = sandbox.agent
    listing = await agent.exec("ls").arg("/").run()
    assert listing.exit_code == 0 and {"bin", "etc", "tmp", "usr"} <= set(listing.stdout.split())
    version = await agent.exec("python3").args(["-c", "import sys; print(sys.version)"]).run()
    assert version.stdout.startswith("3.11")
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
    no_stdin = await agent.exec("cat").timeout(5).run()  # stdin is /dev/null, not a hang
    assert (no_stdin.exit_code, no_stdin.stdout) == (0, "")
    for code in (0, 1, 42):
        assert (await agent.exec("sh").args(["-c", f"exit {code}"]).run()).exit_code == code
    killed = await agent.exec("sh").args(["-c", "kill -KILL $$"]).run()
    assert (killed.exit_code, killed.signal) == (128 + 9, 9)
    no_shell = await agent.exec("echo").args(["$HOME", "a b", "*"]).run()
    assert no_shell.stdout == "$HOME a b *\n"


async def test_binary_and_non_utf8_output_is_exact(sandbox: capsa.Sandbox) -> None:
    script = "import sys; sys.stdout.buffer.write(bytes(range(256)) * 4096)"
    r = await sandbox.agent.exec("python3").args(["-c", script]).run()
    assert r.stdout_bytes == bytes(range(256)) * 4096
    bad = await sandbox.agent.exec("printf").arg("caf\\351 ok\\n").run()
    assert bad.stdout_bytes == b"caf\xe9 ok\n"
    assert bad.stdout == "caf\ufffd ok\n"


async def test_spawn_streams_output_while_the_command_runs(sandbox: capsa.Sandbox) -> None:
    p = await sandbox.agent.exec("sh").args(["-c", "for i in 1 2 3; do echo $i; sleep 1; done"]).spawn()
    arrivals: list[tuple[bytes, float]] = []
    started = time.monotonic()
    async for chunk in p.stdout:
        arrivals.append((chunk, time.monotonic() - started))
    assert b"".join(c for c, _ in arrivals) == b"1\n2\n3\n"
    assert arrivals[0][1] < 1.0 < arrivals[-1][1]  # the first line came before the command ended
    assert await p.wait(timeout=10) == 0


async def test_kill_signals_the_process_group(sandbox: capsa.Sandbox) -> None:
    p = await sandbox.agent.exec("sh").args(["-c", "echo up; sleep 60 & wait"]).spawn()
    assert await p.stdout.__anext__() == b"up\n"
    await p.kill(signal.SIGTERM)
    assert await p.wait(timeout=10) == 128 + signal.SIGTERM
    assert p.signal == signal.SIGTERM
    left = await sandbox.agent.exec("sh").args(["-c", "ps -eo comm | grep -c '^sleep$' || true"]).run()
    assert left.stdout.strip() == "0"
    await p.kill()  # already gone: no error


async def test_interactive_stdin(sandbox: capsa.Sandbox) -> None:
    p = await sandbox.agent.exec("cat").spawn()
    await p.write_stdin(b"ping\n")
    assert await p.stdout.__anext__() == b"ping\n"
    await p.write_stdin(b"x" * (3 << 20))  # more than one chunk, with back-pressure
    await p.close_stdin()
    rest = await p.stdout.read()
    assert rest == b"x" * (3 << 20)
    assert await p.wait(timeout=10) == 0


async def test_timeout_kills_the_command_and_keeps_partial_output(sandbox: capsa.Sandbox) -> None:
    started = time.monotonic()
    with pytest.raises(capsa.ExecTimeoutError) as info:
        await sandbox.agent.exec("sh").args(["-c", "echo before; sleep 60"]).timeout(2).run()
    assert time.monotonic() - started < 10
    assert isinstance(info.value, TimeoutError)
    assert info.value.stdout == b"before\n"
    assert info.value.argv == ["sh", "-c", "echo before; sleep 60"]
    left = await sandbox.agent.exec("sh").args(["-c", "ps -eo comm | grep -c '^sleep$' || true"]).run()
    assert left.stdout.strip() == "0"


async def test_missing_program_cwd_and_permission_are_clear_errors(sandbox: capsa.Sandbox) -> None:
    agent = sandbox.agent
    with pytest.raises(
        capsa.GuestFileNotFoundError, match="program 'no-such-program' not found"
    ) as info:
        await agent.exec("no-such-program").run()
    assert info.value.path == "no-such-program"
    with pytest.raises(capsa.GuestFileNotFoundError, match="working directory /nowhere") as cwd:
        await agent.exec("ls").cwd("/nowhere").run()
    assert cwd.value.path == "/nowhere"
    await agent.write_file("/tmp/not-executable", b"#!/bin/sh\necho hi\n", mode=0o644)
    with pytest.raises(capsa.GuestPermissionError):
        await agent.exec("/tmp/not-executable").run()
    assert (await agent.exec("true").run()).exit_code == 0  # the agent is still fine


async def test_twenty_concurrent_execs(sandbox: capsa.Sandbox) -> None:
    async def one(i: int) -> capsa.ExecResult:
        return await sandbox.agent.exec("sh").args(["-c", f"sleep 1; echo {i}; echo e{i} >&2"]).run()

    started = time.monotonic()
    results = await asyncio.gather(*(one(i) for i in range(20)))
    elapsed = time.monotonic() - started
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(20)]
    assert [r.stderr for r in results] == [f"e{i}\n" for i in range(20)]
    assert elapsed < 15  # concurrent: 20 sequential runs would take over 20 s


async def test_output_limit_stops_a_runaway_command(sandbox: capsa.Sandbox) -> None:
    with pytest.raises(capsa.ExecOutputLimitError) as info:
        await sandbox.agent.exec("yes").max_output(1 << 20).timeout(60).run()
    assert len(info.value.stdout) == 1 << 20
    assert (await sandbox.agent.exec("true").run()).exit_code == 0


async def test_pty_size_resize_and_ctrl_c(sandbox: capsa.Sandbox) -> None:
    sizes = await sandbox.agent.exec("sh").args(["-c", "tty; stty size"]).pty(24, 80).run()
    assert sizes.stdout.replace("\r", "").splitlines()[1] == "24 80"
    assert sizes.stdout.startswith("/dev/pts/") and sizes.stderr == ""
    shell = await sandbox.agent.exec("sh").pty(30, 90).spawn()

    async def read_until(marker: bytes) -> bytes:
        seen = b""
        async with asyncio.timeout(30):
            while marker not in seen:
                seen += await shell.stdout.__anext__()
        return seen

    await shell.write_stdin(b"sleep 60; echo af$((1+2))ter\n")
    for _ in range(300):  # interrupt only once the sleep runs (seen by a second command)
        running = await sandbox.agent.exec("sh").args(["-c", "grep -qx sleep /proc/[0-9]*/comm"]).run()
        if running.exit_code == 0:
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail("the shell never started the sleep")
    await shell.write_stdin(b"\x03")  # Ctrl-C through the terminal interrupts sleep, not the shell
    await shell.resize(40, 120)
    await shell.write_stdin(b"stty size; echo ma$((2+3))rker\n")
    seen = await read_until(b"ma5rker")  # the shell survived and runs the next line (not after 60 s)
    assert b"40 120" in seen
    assert b"af3ter" not in seen  # the interrupt ended the whole list, as at a terminal
    await shell.write_stdin(b"exit 7\n")
    assert await shell.wait(timeout=30) == 7


async def test_commands_and_writes_as_another_account(sandbox: capsa.Sandbox) -> None:
    """``user=``: a command runs with the account's ids, groups, environment and home; a write or
    mkdir hands what it creates to it; an account the guest lacks is an UnknownUserError."""
    agent = sandbox.agent
    made = "groupadd -g 2345 crew && useradd -m -u 1234 -U -G crew -s /bin/sh tester"
    assert (await agent.exec("sh").args(["-c", made]).run()).exit_code == 0
    probe = 'echo "$(id -u):$(id -g):$(id -G):$HOME:$USER:$LOGNAME:$(pwd)"'
    run = await agent.exec("sh").args(["-c", probe]).user("tester").run()
    assert run.stdout == "1234:1234:1234 2345:/home/tester:tester:tester:/home/tester\n", run
    elsewhere = await agent.exec("pwd").user("tester").cwd("/tmp").run()
    assert elsewhere.stdout == "/tmp\n"
    terminal = (
        await agent.exec("sh").args(["-c", "id -un; stat -c %U $(tty)"]).user("tester").pty().run()
    )
    assert terminal.stdout.replace("\r", "").split() == ["tester", "tester"], terminal
    denied = await agent.exec("touch").arg("/root/x").user("tester").run()
    assert denied.exit_code != 0  # really unprivileged: root's home is closed to it
    default = await agent.exec("sh").args(["-c", probe]).run()
    assert default.stdout == "0:0:0:/root:::/\n", default  # the library default is unchanged

    await agent.mkdir("/srv/a/b", parents=True, user="tester")
    await agent.write_file("/srv/a/b/f", b"hi", user="tester")
    await agent.write_file("/srv/rootfile", b"hi")
    owners = (
        await agent.exec("stat").args(["-c", "%U:%G", "/srv", "/srv/a", "/srv/a/b", "/srv/a/b/f"]).run()
    )
    assert owners.stdout.split() == ["root:root", "tester:tester", "tester:tester", "tester:tester"]
    assert (await agent.stat("/srv/rootfile")).uid == 0
    await agent.write_file("/srv/rootfile", b"again", mode=0o600, user="tester")  # an existing file
    replaced = await agent.stat("/srv/rootfile")
    assert (replaced.uid, replaced.gid, replaced.mode) == (1234, 1234, 0o600)

    with pytest.raises(capsa.UnknownUserError) as info:
        await agent.exec("true").user("nobody-here").run()
    assert info.value.user == "nobody-here" and info.value.hint
    with pytest.raises(capsa.UnknownUserError):
        await agent.write_file("/srv/x", b"", user="nobody-here")
    with pytest.raises(capsa.UnknownUserError):
        await agent.mkdir("/srv/y", user="nobody-here")
    assert not await agent.exists("/srv/x") and not await agent.exists("/srv/y")
