"""``capsa serve`` through the real ``e2b`` and ``e2b-code-interpreter`` SDKs, with real guests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import threading
import time

import httpx
import pytest

e2b = pytest.importorskip("e2b")
code_interpreter = pytest.importorskip("e2b_code_interpreter")

from e2b import (  # noqa: E402
    AsyncSandbox,
    AuthenticationException,
    CommandExitException,
    FilesystemEventType,
    NotFoundException,
    RateLimitException,
    Sandbox,
    SandboxException,
    SandboxQuery,
    TimeoutException,
)

from tests.server.conftest import API_KEY, Server  # noqa: E402

pytestmark = [pytest.mark.vm, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def sbx(server: Server) -> Sandbox:
    """One sandbox shared by the tests that only run commands and touch files."""
    sandbox = Sandbox.create(timeout=600, metadata={"suite": "shared"}, envs={"FROM_CREATE": "yes"})
    yield sandbox
    sandbox.kill()


def test_health_needs_no_key(server: Server) -> None:
    reply = httpx.get(f"{server.url}/health")
    assert reply.status_code == 200
    assert reply.json()["status"] == "ok"


def test_bad_api_key_raises_the_sdk_auth_error(server: Server) -> None:
    with pytest.raises(AuthenticationException):
        Sandbox.create(api_key="wrong-key")
    with pytest.raises(AuthenticationException):
        Sandbox.list(api_key="wrong-key").next_items()


def test_unknown_ids_and_templates(server: Server) -> None:
    with pytest.raises(NotFoundException):
        Sandbox.get_info("inosuchsandbox")
    assert Sandbox.kill("inosuchsandbox") is False
    with pytest.raises(NotFoundException):
        Sandbox.connect("inosuchsandbox")
    with pytest.raises(SandboxException, match="not found"):
        Sandbox.create(template="no-such-template")


def test_control_plane(server: Server, sbx: Sandbox) -> None:
    info = sbx.get_info()
    assert info.sandbox_id == sbx.sandbox_id
    assert info.template_id == "base"
    assert info.metadata == {"suite": "shared"}
    assert sbx.is_running()
    listed = Sandbox.list(query=SandboxQuery(metadata={"suite": "shared"})).next_items()
    assert [s.sandbox_id for s in listed] == [sbx.sandbox_id]
    assert Sandbox.list(query=SandboxQuery(metadata={"suite": "other"})).next_items() == []
    before = info.end_at
    sbx.set_timeout(900)
    assert sbx.get_info().end_at > before
    again = Sandbox.connect(sbx.sandbox_id)
    assert again.commands.run("echo $FROM_CREATE").stdout == "yes\n"


@pytest.mark.timeout(300)
def test_pause_and_resume_keep_files(server: Server) -> None:
    sandbox = Sandbox.create(timeout=300, metadata={"suite": "pause"})
    try:
        sandbox.files.write("/root/kept.txt", "survives a pause")
        sandbox.commands.run("echo in-memory > /tmp/tmpfs-or-disk.txt")
        sandbox.commands.run("sleep 600", background=True)  # kept by the pause
        sandbox.pause()
        assert not sandbox.is_running()
        [info] = Sandbox.list(query=SandboxQuery(metadata={"suite": "pause"})).next_items()
        assert info.state.value == "paused"
        assert Sandbox.get_info(sandbox.sandbox_id).state.value == "paused"
        resumed = Sandbox.connect(sandbox.sandbox_id, timeout=120)
        assert resumed.is_running()
        assert resumed.files.read("/root/kept.txt") == "survives a pause"
        assert resumed.commands.run("cat /tmp/tmpfs-or-disk.txt").stdout == "in-memory\n"
        assert Sandbox.get_info(sandbox.sandbox_id).state.value == "running"
    finally:
        Sandbox.kill(sandbox.sandbox_id)


def test_create_kill_and_max_sandboxes(server: Server, sbx: Sandbox) -> None:
    started = time.monotonic()
    first = Sandbox.create(timeout=60)
    created_in = time.monotonic() - started
    others = [Sandbox.create(timeout=60) for _ in range(2)]  # with sbx: 4, the --max-sandboxes
    try:
        with pytest.raises(RateLimitException, match="max-sandboxes"):
            Sandbox.create(timeout=60)
    finally:
        for other in others:
            other.kill()
    assert first.commands.run("true").exit_code == 0
    assert first.kill() is True
    assert not first.is_running()
    with pytest.raises(NotFoundException):
        first.get_info()
    assert created_in < 30  # a pool take (the pool may still be filling on a loaded machine)


def test_expired_sandbox_is_removed(server: Server) -> None:
    sandbox = Sandbox.create(timeout=3)
    assert sandbox.is_running()
    deadline = time.monotonic() + 20
    while sandbox.is_running() and time.monotonic() < deadline:
        time.sleep(0.3)
    assert not sandbox.is_running()
    with pytest.raises(NotFoundException):
        sandbox.get_info()


def test_commands_foreground(sbx: Sandbox) -> None:
    out: list[str] = []
    err: list[str] = []
    result = sbx.commands.run(
        "echo $GREETING; pwd; echo oops >&2",
        envs={"GREETING": "hello"},
        cwd="/tmp",
        on_stdout=out.append,
        on_stderr=err.append,
    )
    assert result.exit_code == 0
    assert result.stdout == "hello\n/tmp\n"
    assert result.stderr == "oops\n"
    assert "".join(out) == result.stdout and "".join(err) == result.stderr
    with pytest.raises(CommandExitException) as failed:
        sbx.commands.run("echo before; exit 3")
    assert failed.value.exit_code == 3
    assert failed.value.stdout == "before\n"
    started = time.monotonic()
    with pytest.raises(TimeoutException):
        sbx.commands.run("sleep 30", timeout=2)
    assert time.monotonic() - started < 15
    procs = sbx.commands.run("for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline; echo; done").stdout
    assert "sleep 30" not in procs  # killed on the deadline


def test_commands_background(sbx: Sandbox) -> None:
    handle = sbx.commands.run("read line; echo got $line; sleep 60", background=True, stdin=True)
    assert handle.pid in [p.pid for p in sbx.commands.list()]
    handle.send_stdin("ping\n")
    seen: list[str] = []
    watcher = sbx.commands.connect(handle.pid)

    def follow() -> None:
        with contextlib.suppress(CommandExitException):
            watcher.wait(on_stdout=seen.append)

    thread = threading.Thread(target=follow)
    thread.start()
    deadline = time.monotonic() + 20
    while "got ping\n" not in "".join(seen) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "got ping" in "".join(seen)
    assert handle.kill() is True
    with pytest.raises(CommandExitException):
        handle.wait()
    thread.join(20)
    assert handle.pid not in [p.pid for p in sbx.commands.list()]
    quick = sbx.commands.run("echo done", background=True)
    assert quick.wait().stdout == "done\n"


def test_files(sbx: Sandbox) -> None:
    info = sbx.files.write("/tmp/files/a.txt", "hello")
    assert info.path == "/tmp/files/a.txt"
    assert sbx.files.read("/tmp/files/a.txt") == "hello"
    sbx.files.write("/tmp/files/b.bin", b"\x00\xff" * 1000)
    assert bytes(sbx.files.read("/tmp/files/b.bin", format="bytes")) == b"\x00\xff" * 1000
    assert b"".join(sbx.files.read("/tmp/files/a.txt", format="stream")) == b"hello"
    sbx.files.write_files(
        [{"path": "/tmp/files/c.txt", "data": "c"}, {"path": "/tmp/files/d.txt", "data": "d"}]
    )
    assert sorted(e.name for e in sbx.files.list("/tmp/files")) == ["a.txt", "b.bin", "c.txt", "d.txt"]
    assert sbx.files.make_dir("/tmp/files/sub") is True
    assert sbx.files.make_dir("/tmp/files/sub") is False
    assert sbx.files.get_info("/tmp/files/sub").type.value == "dir"
    stat = sbx.files.get_info("/tmp/files/b.bin")
    assert stat.size == 2000 and stat.type.value == "file"
    moved = sbx.files.rename("/tmp/files/c.txt", "/tmp/files/sub/c2.txt")
    assert moved.path == "/tmp/files/sub/c2.txt"
    assert not sbx.files.exists("/tmp/files/c.txt")
    assert sbx.files.exists("/tmp/files/sub/c2.txt")
    assert "c2.txt" in [e.name for e in sbx.files.list("/tmp/files", depth=2)]
    sbx.files.remove("/tmp/files")
    assert not sbx.files.exists("/tmp/files")
    with pytest.raises(e2b.FileNotFoundException):
        sbx.files.read("/tmp/files/a.txt")


def test_watch_dir_sync_and_async(sbx: Sandbox) -> None:
    """Both ways the SDKs watch: CreateWatcher/GetWatcherEvents (sync), WatchDir stream (async)."""
    sbx.files.make_dir("/tmp/watched/sub")
    handle = sbx.files.watch_dir("/tmp/watched")
    sbx.files.write("/tmp/watched/a.txt", "1")
    assert [(e.name, e.type) for e in handle.get_new_events()] == [
        ("a.txt", FilesystemEventType.CREATE),
        ("a.txt", FilesystemEventType.WRITE),  # a new file with content was written too
    ]
    sbx.files.write("/tmp/watched/a.txt", "22")
    sbx.commands.run("chmod 600 /tmp/watched/sub/../a.txt; touch /tmp/watched/sub/deep")
    seen = {(e.name, e.type) for e in handle.get_new_events()}
    assert ("a.txt", FilesystemEventType.WRITE) in seen
    assert not any(name == "sub/deep" for name, _ in seen)  # not recursive
    sbx.files.remove("/tmp/watched/a.txt")
    assert ("a.txt", FilesystemEventType.REMOVE) in {(e.name, e.type) for e in handle.get_new_events()}
    handle.stop()
    with pytest.raises(SandboxException):
        handle.get_new_events()

    async def watch_async() -> set[tuple[str, object]]:
        sandbox = await AsyncSandbox.connect(sbx.sandbox_id)
        events: list[tuple[str, object]] = []
        watch = await sandbox.files.watch_dir(
            "/tmp/watched", lambda e: events.append((e.name, e.type)), recursive=True
        )
        await sandbox.files.write("/tmp/watched/sub/new.txt", "x")
        deadline = time.monotonic() + 10
        while ("sub/new.txt", FilesystemEventType.CREATE) not in events:
            assert time.monotonic() < deadline, events
            await asyncio.sleep(0.1)
        await watch.stop()
        return set(events)

    assert ("sub/new.txt", FilesystemEventType.CREATE) in asyncio.run(watch_async())
    with pytest.raises(NotFoundException):
        sbx.files.watch_dir("/tmp/no-such-dir")
    sbx.files.remove("/tmp/watched")


def test_path_traversal_stays_in_the_guest(sbx: Sandbox, tmp_path: object) -> None:
    """Attack: a client reads or writes ``../..`` paths hoping to reach the server's filesystem."""
    guest_hostname = sbx.commands.run("hostname").stdout.strip()
    assert sbx.files.read("../../../../etc/hostname").strip() == guest_hostname
    sbx.files.write("../../../../tmp/capsa-traversal-probe", "x")
    assert sbx.commands.run("cat /tmp/capsa-traversal-probe").stdout == "x"
    assert not os.path.exists("/tmp/capsa-traversal-probe")


def test_bad_access_token_is_refused(server: Server, sbx: Sandbox) -> None:
    """Attack: a client that knows a sandbox id but not its access token drives its envd."""
    headers = {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "49983"}
    for token in (None, "wrong"):
        extra = {"X-Access-Token": token} if token else {}
        reply = httpx.post(
            f"{server.url}/process.Process/List",
            json={},
            headers={**headers, **extra},
        )
        assert reply.status_code == 401
        assert reply.json()["code"] == "unauthenticated"
        files = httpx.get(
            f"{server.url}/files", params={"path": "/etc/hostname"}, headers={**headers, **extra}
        )
        assert files.status_code == 401
        execute = httpx.post(
            f"{server.url}/execute",
            json={"code": "1"},
            headers={**headers, "E2b-Sandbox-Port": "49999", **extra},
        )
        assert execute.status_code == 401


def test_code_interpreter(server: Server) -> None:
    sandbox = code_interpreter.Sandbox.create(timeout=120)
    try:
        assert sandbox.run_code("x = 1").error is None
        execution = sandbox.run_code("print('out'); import sys; print('err', file=sys.stderr); x + 1")
        assert execution.text == "2"
        assert execution.logs.stdout == ["out", "\n"] or "".join(execution.logs.stdout) == "out\n"
        assert "".join(execution.logs.stderr) == "err\n"
        failed = sandbox.run_code("raise ValueError('bad value')")
        assert failed.error is not None
        assert failed.error.name == "ValueError"
        assert failed.error.value == "bad value"
        assert "ValueError" in failed.error.traceback
        context = sandbox.create_code_context()
        isolated = sandbox.run_code("x", context=context)
        assert isolated.error is not None and isolated.error.name == "NameError"
        assert sandbox.run_code("y = 5; y", context=context).text == "5"
        assert sandbox.run_code("x").text == "1"
        assert {c.id for c in sandbox.list_code_contexts()} >= {context.id}
        sandbox.remove_code_context(context)
        seen: list[str] = []
        sandbox.run_code("for i in range(3): print(i)", on_stdout=lambda m: seen.append(m.line))
        assert "".join(seen) == "0\n1\n2\n"
    finally:
        sandbox.kill()
    # any template: the interpreter starts on the first run_code, with the create-time envs
    plain = code_interpreter.Sandbox.create(template="base", timeout=120, envs={"CI_ENV": "set"})
    try:
        assert plain.run_code("import os; os.environ['CI_ENV']").text == "'set'"
    finally:
        plain.kill()


def test_code_interpreter_envs_from_a_warm_pool(server: Server) -> None:
    sandbox = code_interpreter.Sandbox.create(timeout=120, envs={"CI_ENV": "warm"})
    try:
        assert sandbox.run_code("import os; os.environ['CI_ENV']").text == "'warm'"
        assert sandbox.commands.run("echo $CI_ENV").stdout == "warm\n"
        sandbox.run_code("kept = True")
        sandbox.pause()  # the interpreter process is kept by the snapshot
        resumed = code_interpreter.Sandbox.connect(sandbox.sandbox_id)
        assert resumed.run_code("1 + 1").text == "2"
        assert resumed.run_code("kept").text == "True"
        assert resumed.run_code("import os; os.environ['CI_ENV']").text == "'warm'"
    finally:
        sandbox.kill()


def test_async_sdk_and_concurrent_clients(server: Server, sbx: Sandbox) -> None:
    async def client(index: int) -> list[str]:
        sandbox = await AsyncSandbox.create(timeout=120)
        try:
            outputs = []
            for n in range(5):
                result = await sandbox.commands.run(f"echo {index}-{n}")
                outputs.append(result.stdout.strip())
            await sandbox.files.write("/tmp/x", str(index))
            assert await sandbox.files.read("/tmp/x") == str(index)
            return outputs
        finally:
            await sandbox.kill()

    async def main() -> list[list[str]]:
        return await asyncio.gather(*(client(i) for i in range(3)))  # sbx + 3 = --max-sandboxes

    results = asyncio.run(main())
    assert results == [[f"{i}-{n}" for n in range(5)] for i in range(3)]


KILLED_CLIENT = """
import sys
from e2b import Sandbox
sandbox = Sandbox.connect(sys.argv[1])
sandbox.commands.run(
    "for i in $(seq 200); do echo line $i; sleep 0.05; done",
    on_stdout=lambda text: print(text, end="", flush=True),
)
"""


def test_client_process_killed_mid_stream(server: Server, sbx: Sandbox) -> None:
    """A client process SIGKILLed while a command streams to it leaves the server working."""
    client = subprocess.Popen(
        [sys.executable, "-c", KILLED_CLIENT, sbx.sandbox_id],
        stdout=subprocess.PIPE,
        env={**os.environ, **server.env()},
    )
    try:
        assert client.stdout is not None
        assert client.stdout.readline().startswith(b"line")
    finally:
        client.kill()
        client.wait(10)
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert sbx.commands.run("echo still here").stdout == "still here\n"


def test_client_killed_mid_stream(server: Server, sbx: Sandbox) -> None:
    """A client that drops a command's stream leaves the server (and the sandbox) working."""
    handle = sbx.commands.run("for i in $(seq 100); do echo $i; sleep 0.1; done", background=True)
    handle.disconnect()
    assert sbx.commands.run("echo still here").stdout == "still here\n"
    assert handle.pid in [p.pid for p in sbx.commands.list()]
    sbx.commands.kill(handle.pid)


PROBE = """
import sys, urllib.request
for url in sys.argv[1:]:
    try:
        urllib.request.urlopen(url, timeout=5).read()
        print(url, "ok")
    except Exception as exc:
        print(url, "failed", type(exc).__name__)
"""


@pytest.mark.timeout(300)
def test_network_allow_out_reaches_only_that(server: Server) -> None:
    """Attack: code in a sandbox with ``allow_out=["allowed.test"]`` reaches anything else."""
    port = server.http_port
    sandbox = Sandbox.create(
        timeout=300, network={"allow_out": ["allowed.test"], "deny_out": ["0.0.0.0/0"]}
    )
    try:
        sandbox.files.write("/tmp/probe.py", PROBE)
        urls = [
            f"http://allowed.test:{port}/",
            f"http://denied.test:{port}/",
            f"http://127.0.0.1:{port}/",
        ]
        out = sandbox.commands.run(f"python3 /tmp/probe.py {' '.join(urls)}", timeout=120).stdout
        result = dict(line.split(" ", 1) for line in out.splitlines())
        assert result[urls[0]] == "ok"
        assert result[urls[1]].startswith("failed")
        assert result[urls[2]].startswith("failed")
        # the two denials are counted in /metrics, for this sandbox and in total
        mine = f'capsa_server_sandbox_egress_denials_total{{sandbox="{sandbox.sandbox_id}"}}'
        assert _metric(server, mine) >= 2
        assert _metric(server, "capsa_server_egress_denials_total") >= 2
    finally:
        sandbox.kill()
    assert _metric(server, mine) is None  # a removed sandbox's series goes with it
    assert _metric(server, "capsa_server_egress_denials_total") >= 2


def _metric(server: Server, name: str) -> float | None:
    """The value of one series in ``/metrics`` (summed over its labels when ``name`` has none)."""
    values = []
    for line in _scrape(server).splitlines():
        series, _, value = line.rpartition(" ")
        if series == name or ("{" not in name and series.startswith(name + "{")):
            values.append(float(value))
    return sum(values) if values else None


def _scrape(server: Server) -> str:
    reply = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {API_KEY}"})
    reply.raise_for_status()
    return reply.text


def test_metrics(server: Server) -> None:
    assert httpx.get(f"{server.url}/metrics").status_code == 401  # it needs a key
    text = _scrape(server)
    assert "capsa_server_sandboxes_running" in text
    assert "capsa_server_sandbox_create_seconds_bucket" in text
    assert "capsa_server_commands_total" in text


OLD_SDK_SCRIPT = """
import e2b, sys
from e2b import CommandExitException, Sandbox
assert e2b.__file__.startswith(sys.argv[1]), e2b.__file__
sandbox = Sandbox.create(timeout=60, metadata={"sdk": "old"})
try:
    assert sandbox.commands.run("echo hi").stdout == "hi\\n"
    try:
        sandbox.commands.run("exit 2")
        raise AssertionError("no CommandExitException")
    except CommandExitException as exc:
        assert exc.exit_code == 2
    sandbox.files.write("/tmp/old/x", "y")
    assert sandbox.files.read("/tmp/old/x") == "y"
    assert [s.sandbox_id for s in Sandbox.list().next_items() if s.metadata == {"sdk": "old"}] == [
        sandbox.sandbox_id
    ]
finally:
    sandbox.kill()
print("old sdk ok")
"""


@pytest.mark.skipif(
    not os.environ.get("CAPSA_TEST_E2B_OLD"),
    reason="set CAPSA_TEST_E2B_OLD to a `pip install --target DIR e2b==2.50.0` directory",
)
def test_an_older_sdk_on_the_v1_create_endpoint(server: Server) -> None:
    """e2b 2.50 creates with POST /sandboxes (newer ones with POST /v2/sandboxes)."""
    target = os.environ["CAPSA_TEST_E2B_OLD"]
    result = subprocess.run(
        [sys.executable, "-c", OLD_SDK_SCRIPT, target],
        env={**os.environ, **server.env(), "PYTHONPATH": target},
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "old sdk ok" in result.stdout
