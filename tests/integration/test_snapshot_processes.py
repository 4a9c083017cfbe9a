"""Running processes survive snapshots and forks: they freeze with the VM, go on after the restore,
and the new host lists them (``agent.processes()``) and attaches to them (``agent.attach(pid)``)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import capsa
from tests.conftest import SandboxFactory

pytestmark = [pytest.mark.vm, pytest.mark.asyncio]

COUNTER = "i=0; while :; do echo $i; i=$((i+1)); sleep 0.2; done"


async def _numbers(process: capsa.Process, count: int, timeout: float = 60.0) -> list[int]:
    """The next ``count`` lines of a counter's stdout, as numbers."""
    numbers: list[int] = []
    async with asyncio.timeout(timeout):
        while len(numbers) < count:
            line = await process.stdout.readline()
            assert line, f"the counter's output ended after {numbers}"
            numbers.append(int(line))
    return numbers


def _consecutive(numbers: list[int]) -> bool:
    return numbers == list(range(numbers[0], numbers[0] + len(numbers)))


@pytest.mark.timeout(240)
async def test_a_counter_survives_a_snapshot_and_its_restore_attaches_to_it(
    tmp_path: Path, sandbox_factory: SandboxFactory
) -> None:
    vm = await sandbox_factory()
    counter = await vm.agent.exec("sh").args(["-c", COUNTER]).spawn()
    before = await _numbers(counter, 3)
    snap = await vm.snapshot(tmp_path / "snap")
    # The parent's handle goes on working: no number lost or repeated across the snapshot.
    after = await _numbers(counter, 3)
    assert _consecutive(before + after), before + after

    restored = await sandbox_factory(capsa.sandbox().from_snapshot(snap))
    listed = {p.pid: p for p in await restored.agent.processes()}
    assert counter.pid in listed, listed
    info = listed[counter.pid]
    assert info.running and not info.attached and not info.pty
    assert info.argv == ("sh", "-c", COUNTER)
    await asyncio.sleep(1.0)  # it keeps counting while nobody is attached: that output is kept
    copy = await restored.agent.attach(counter.pid)
    resumed = await _numbers(copy, 10)
    # The copy goes on from where the parent's host had consumed (its readline may have taken one
    # more line than it returned): nothing lost, nothing repeated, the detached second included.
    assert before[-1] < resumed[0] <= after[0] + 1 and _consecutive(resumed), (before, resumed)
    assert [p.attached for p in await restored.agent.processes() if p.pid == counter.pid] == [True]
    with pytest.raises(capsa.AgentError, match="attached"):
        await restored.agent.attach(counter.pid)
    await copy.kill()
    assert await copy.wait(timeout=20) == 137
    assert counter.pid not in {p.pid for p in await restored.agent.processes()}
    with pytest.raises(capsa.AgentError):
        await restored.agent.attach(counter.pid)  # collected: gone

    await counter.kill()  # the parent's own process is untouched by the copy's kill
    assert await counter.wait(timeout=20) == 137


@pytest.mark.timeout(240)
async def test_each_fork_keeps_a_copy_of_the_running_processes(
    sandbox_factory: SandboxFactory,
) -> None:
    vm = await sandbox_factory()
    counter = await vm.agent.exec("sh").args(["-c", COUNTER]).spawn()
    first = await _numbers(counter, 2)
    children = await vm.fork(2)
    try:
        for child in children:
            copy = await child.agent.attach(counter.pid)
            numbers = await _numbers(copy, 4)
            assert first[-1] < numbers[0] <= first[-1] + 2, (first, numbers)
            assert _consecutive(numbers), numbers
            await copy.kill()
            assert await copy.wait(timeout=20) == 137
        assert _consecutive(first + await _numbers(counter, 3))  # the parent's goes on
    finally:
        for child in children:
            await child.kill()
    await counter.kill()


# A tiny interpreter: each stdin line is evaluated (or executed) in one namespace, the answer printed.
REPL = """import sys
ns = {}
for line in sys.stdin:
    try:
        print(repr(eval(line, ns)), flush=True)
    except SyntaxError:
        exec(line, ns)
        print("ok", flush=True)
"""


async def _ask(process: capsa.Process, line: bytes) -> bytes:
    await process.write_stdin(line + b"\n")
    async with asyncio.timeout(30):
        return (await process.stdout.readline()).rstrip(b"\n")


@pytest.mark.timeout(240)
async def test_each_fork_keeps_a_copy_of_a_running_interpreter_with_its_variables(
    sandbox_factory: SandboxFactory,
) -> None:
    """What ``capsa serve``'s code interpreter relies on for its forks: a stateful process of the
    parent, attached in each fork, answers with the parent's variables; the copies diverge."""
    vm = await sandbox_factory()
    repl = await vm.agent.exec("python3").args(["-u", "-c", REPL]).spawn()
    assert await _ask(repl, b"x = 41") == b"ok"
    children = await vm.fork(2)
    try:
        copies = [await child.agent.attach(repl.pid) for child in children]
        assert [await _ask(copy, b"x + 1") for copy in copies] == [b"42", b"42"]
        assert await _ask(copies[0], b"x = 100") == b"ok"
        assert await _ask(copies[1], b"x") == b"41"
        assert await _ask(copies[0], b"x") == b"100"
        assert await _ask(repl, b"x") == b"41"  # the parent's own is untouched
    finally:
        for child in children:
            await child.kill()
    await repl.kill()


@pytest.mark.timeout(240)
async def test_output_written_while_no_host_is_attached_is_kept_and_bounded(
    tmp_path: Path, sandbox_factory: SandboxFactory
) -> None:
    """A restored copy's process writes ~2.7 MiB while nobody is attached: past the guest's bound
    (1 MiB per stream) it blocks on its pipe instead of finishing or losing output, and attaching
    delivers every line, in order."""
    vm = await sandbox_factory()
    script = "while [ ! -e /tmp/go ]; do sleep 0.1; done; seq 1 400000; echo done"
    waiting = await vm.agent.exec("sh").args(["-c", script]).spawn()
    snap = await vm.snapshot(tmp_path / "snap")
    await waiting.kill()
    restored = await sandbox_factory(capsa.sandbox().from_snapshot(snap))
    await restored.agent.write_file("/tmp/go", b"")
    await asyncio.sleep(4.0)  # ample time for seq to print it all, were its output not bounded
    listed = {p.pid: p for p in await restored.agent.processes()}
    assert listed[waiting.pid].running, "past the guest's bound the writer must block, not finish"
    copy = await restored.agent.attach(waiting.pid)
    data = await asyncio.wait_for(copy.stdout.read(), 120)
    lines = data.split(b"\n")
    assert lines[-2:] == [b"done", b""]
    assert [int(x) for x in lines[:-2]] == list(range(1, 400001))
    assert await copy.wait(timeout=30) == 0


@pytest.mark.timeout(240)
async def test_a_terminal_session_is_attached_again_after_a_restore(
    tmp_path: Path, sandbox_factory: SandboxFactory
) -> None:
    vm = await sandbox_factory()
    shell = await vm.agent.exec("sh").pty(24, 80).spawn()
    await shell.write_stdin(b"X=kept-in-the-shell\n")
    snap = await vm.snapshot(tmp_path / "snap")
    await shell.kill()
    restored = await sandbox_factory(capsa.sandbox().from_snapshot(snap))
    [info] = [p for p in await restored.agent.processes() if p.pid == shell.pid]
    assert info.pty and info.running
    copy = await restored.agent.attach(shell.pid)
    assert await copy.stderr.read() == b""  # a terminal has one output stream
    await copy.resize(30, 100)
    await copy.write_stdin(b"echo value=$X; stty size; exit 3\n")
    output = await asyncio.wait_for(copy.stdout.read(), 60)
    assert b"value=kept-in-the-shell" in output and b"30 100" in output, output
    assert await copy.wait(timeout=20) == 3
