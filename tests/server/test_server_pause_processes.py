"""``capsa serve``: a pause keeps running commands and the code interpreter. After ``connect()`` a
background command still runs, ``commands.connect(pid)`` streams its continuing output, and the
interpreter's variables are intact. A fork, and a sandbox created from a named snapshot, take up
the saved sandbox's commands and interpreter. One server for the module (``--memory 256``)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest

from tests.server.conftest import Server, start_server

e2b = pytest.importorskip("e2b")
code_interpreter = pytest.importorskip("e2b_code_interpreter")
from e2b import Sandbox  # noqa: E402

pytestmark = [pytest.mark.vm, pytest.mark.timeout(240)]

COUNTER = "i=0; while :; do echo n$i; i=$((i+1)); sleep 0.2; done"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(tmp_path_factory.mktemp("serve"), "--max-sandboxes", "3", "--memory", "256")
    old = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    try:
        yield server
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        code = server.stop()
        assert code in (0, -signal.SIGTERM), server.log.read_text()[-3000:]


def _numbers(text: str) -> list[int]:
    return [int(word[1:]) for word in text.split() if word.startswith("n") and word[1:].isdigit()]


def test_a_background_command_survives_pause_and_connect(server: Server) -> None:
    sandbox = Sandbox.create(timeout=120)
    try:
        handle = sandbox.commands.run(COUNTER, background=True)
        time.sleep(1.0)
        sandbox.pause()
        with pytest.raises(Exception, match="paused"):  # the stream ends, saying how to come back
            handle.wait()
        resumed = Sandbox.connect(sandbox.sandbox_id, timeout=60)
        listed = [p.pid for p in resumed.commands.list()]
        assert handle.pid in listed, listed
        seen: list[str] = []
        again = resumed.commands.connect(handle.pid)
        deadline = time.monotonic() + 30
        for stdout, _, _ in again:
            if stdout:
                seen.append(stdout)
            if len(_numbers("".join(seen))) >= 8 or time.monotonic() > deadline:
                break
        numbers = _numbers("".join(seen))
        assert len(numbers) >= 8, seen
        assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), numbers  # no gap
        assert numbers[0] > 0  # it went on counting: not a fresh start
        assert resumed.commands.kill(handle.pid)
    finally:
        Sandbox.kill(sandbox.sandbox_id)


def test_the_interpreter_keeps_its_variables_across_a_pause(server: Server) -> None:
    sandbox = code_interpreter.Sandbox.create(timeout=120)
    try:
        assert sandbox.run_code("x = 41").error is None
        sandbox.pause()
        resumed = code_interpreter.Sandbox.connect(sandbox.sandbox_id, timeout=60)
        assert resumed.run_code("x + 1").text == "42"
    finally:
        Sandbox.kill(sandbox.sandbox_id)


def test_a_pause_during_a_running_cell_stops_the_interpreter_cleanly(server: Server) -> None:
    """A cell still running when the pause comes cannot be carried across: its client gets an
    error, the interpreter is stopped, and after the resume a new one answers (variables lost)."""
    sandbox = code_interpreter.Sandbox.create(timeout=120)
    try:
        assert sandbox.run_code("y = 1").error is None
        outcome: list[object] = []

        def slow() -> None:
            try:
                outcome.append(sandbox.run_code("import time; time.sleep(60)", timeout=90))
            except Exception as exc:  # the stream broke: what a pause mid-cell does
                outcome.append(exc)

        worker = threading.Thread(target=slow)
        worker.start()
        time.sleep(2.0)
        sandbox.pause()
        worker.join(60)
        assert not worker.is_alive() and outcome
        resumed = code_interpreter.Sandbox.connect(sandbox.sandbox_id, timeout=60)
        assert resumed.run_code("1 + 1").text == "2"
        assert resumed.run_code("y").error.name == "NameError"
        procs = resumed.commands.run("cat /proc/[0-9]*/cmdline 2>/dev/null; true").stdout
        assert procs.count("python3\x00-u\x00-c") == 1  # the new interpreter only: none leaked
    finally:
        Sandbox.kill(sandbox.sandbox_id)


def _interpreters(sandbox: Sandbox) -> int:
    """How many capsa interpreter processes run in the guest."""
    procs = sandbox.commands.run("cat /proc/[0-9]*/cmdline 2>/dev/null; true").stdout
    return procs.count("python3\x00-u\x00-c")


def test_forks_take_up_the_parents_commands_and_interpreter(server: Server) -> None:
    """Each fork has the parent's background command (still counting) and a copy of its
    interpreter with its variables; the copies are independent of each other and of the parent."""
    parent = code_interpreter.Sandbox.create(timeout=120)
    try:
        assert parent.run_code("x = 41").error is None
        handle = parent.commands.run(COUNTER, background=True)
        time.sleep(1.0)
        children = parent.fork(count=2, timeout=60)
        try:
            assert len(children) == 2
            forked = [code_interpreter.Sandbox.connect(c.sandbox_id) for c in children]
            assert [f.run_code("x + 1").text for f in forked] == ["42", "42"]
            assert forked[0].run_code("x = 100").error is None
            assert forked[1].run_code("x").text == "41"  # each fork its own copy
            assert parent.run_code("x").text == "41"
            assert forked[0].run_code("x").text == "100"
            assert _interpreters(forked[0]) == 1  # the copy, no second one started
            child = children[0]
            assert handle.pid in [p.pid for p in child.commands.list()]
            seen: list[str] = []
            for stdout, _, _ in child.commands.connect(handle.pid):
                seen.append(stdout or "")
                if len(_numbers("".join(seen))) >= 4:
                    break
            numbers = _numbers("".join(seen))
            assert numbers == list(range(numbers[0], numbers[0] + len(numbers))) and numbers[0] > 0
            assert child.commands.kill(handle.pid)
        finally:
            for child in children:
                Sandbox.kill(child.sandbox_id)
        assert handle.pid in [p.pid for p in parent.commands.list()]  # the parent's goes on
        assert parent.run_code("x + 1").text == "42"
        assert parent.commands.kill(handle.pid)
    finally:
        Sandbox.kill(parent.sandbox_id)


def test_a_fork_during_a_running_cell_starts_a_fresh_interpreter(server: Server) -> None:
    """A cell still running when the fork is saved is not waited for: the parent's cell ends
    normally, the fork's copy (caught mid-answer) is stopped and the fork starts a new one."""
    parent = code_interpreter.Sandbox.create(timeout=120)
    try:
        assert parent.run_code("v = 5").error is None
        outcome: list[object] = []
        worker = threading.Thread(
            target=lambda: outcome.append(parent.run_code("import time; time.sleep(4); v * 2"))
        )
        worker.start()
        time.sleep(1.5)
        [child] = parent.fork(count=1, timeout=60)
        try:
            forked = code_interpreter.Sandbox.connect(child.sandbox_id)
            assert forked.run_code("v").error.name == "NameError"  # a fresh interpreter
            assert _interpreters(forked) == 1  # the parent's copy was stopped
        finally:
            Sandbox.kill(child.sandbox_id)
        worker.join(60)
        assert [getattr(o, "text", o) for o in outcome] == ["10"]
    finally:
        Sandbox.kill(parent.sandbox_id)


def test_a_sandbox_from_a_snapshot_has_the_saved_commands_and_interpreter(server: Server) -> None:
    """``Sandbox.create(snapshot_id)`` lists the saved sandbox's background command (reachable with
    ``commands.connect``) and has its interpreter's variables, after the source is gone."""
    source = code_interpreter.Sandbox.create(timeout=120)
    try:
        assert source.run_code("w = 'kept'").error is None
        handle = source.commands.run(COUNTER, background=True)
        time.sleep(0.5)
        snapshot = source.create_snapshot()
    finally:
        Sandbox.kill(source.sandbox_id)
    restored = code_interpreter.Sandbox.create(snapshot.snapshot_id, timeout=60)
    try:
        assert handle.pid in [p.pid for p in restored.commands.list()]
        seen: list[str] = []
        for stdout, _, _ in restored.commands.connect(handle.pid):
            seen.append(stdout or "")
            if len(_numbers("".join(seen))) >= 2:
                break
        assert _numbers("".join(seen))[0] > 0
        assert restored.commands.kill(handle.pid)
        assert restored.run_code("w").text == "'kept'"
    finally:
        Sandbox.kill(restored.sandbox_id)
        Sandbox.delete_snapshot(snapshot.snapshot_id)
