"""``capsa serve --state-dir``: what survives a restart (SIGTERM) and a crash (``kill -9``), the
one-server lock, and the end records (``GET /capsa/ends``, ``capsa serve ends``, ``/metrics``).

One state dir for the module; the tests run in order on it, restarting its server between them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.server.conftest import API_KEY, REPO, Server, free_port, start_server

e2b = pytest.importorskip("e2b")
code_interpreter = pytest.importorskip("e2b_code_interpreter")
from e2b import Sandbox  # noqa: E402

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300)]

ARGS = ("--max-sandboxes", "4", "--memory", "256", "--shutdown-timeout", "90")
OTHER_KEY = "durable-other-tenant-key"  # a key of tenant "other": sees none of the test's ends


class Node:
    """The module's server, restarted on one state dir."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.state = tmp / "state"
        self.server: Server | None = None
        self.port = free_port()  # the same across restarts: the SDK's sandbox objects keep it

    def start(self) -> Server:
        keys = self.tmp / "keys.txt"
        keys.write_text(f"{OTHER_KEY} tenant=other\n")
        self.server = start_server(self.tmp, *ARGS, "--state-dir", str(self.state),
                                   "--api-key-file", str(keys), port=self.port)  # fmt: skip
        os.environ.update(self.server.env())
        return self.server

    def stop(self) -> int:
        assert self.server is not None
        code = self.server.stop()
        assert code in (0, -signal.SIGTERM), self.server.log.read_text()[-3000:]
        return code

    def get(self, path: str, key: str = API_KEY) -> object:
        assert self.server is not None
        request = urllib.request.Request(self.server.url + path, headers={"X-API-KEY": key})
        with urllib.request.urlopen(request, timeout=30) as reply:
            body = reply.read().decode()
        return body if path == "/metrics" else json.loads(body)

    def ends(self) -> dict[str, dict[str, object]]:
        rows = self.get("/capsa/ends?limit=1000")
        assert isinstance(rows, list)
        return {row["sandboxID"]: row for row in rows}


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    old = {k: os.environ.get(k) for k in ("E2B_API_URL", "E2B_SANDBOX_URL", "E2B_API_KEY")}
    node = Node(tmp_path_factory.mktemp("durable"))
    node.start()
    try:
        yield node
    finally:
        if node.server is not None and node.server.process.poll() is None:
            node.stop()
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _descendants(pid: int) -> set[int]:
    """The pids below ``pid`` (QEMU and its helpers), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _all(paginator: Any) -> list[Any]:
    items: list[Any] = []
    while paginator.has_next:
        items += paginator.next_items()
    return items


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_second_server_on_the_state_dir_is_refused_with_the_holders_pid(node: Node) -> None:
    assert node.server is not None
    done = subprocess.run(
        [sys.executable, "-m", "capsa.cli", "serve", "--port", "1", "--state-dir", str(node.state)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={**os.environ, "CAPSA_API_KEY": API_KEY},
    )
    assert done.returncode == 2, done.stderr
    assert f"pid {node.server.process.pid}" in done.stderr, done.stderr


def test_a_restart_keeps_paused_and_running_sandboxes_snapshots_and_ends(node: Node) -> None:
    paused = Sandbox.create(timeout=600)
    paused.files.write("/home/user/kept.txt", "written before the restart")
    sleeper = paused.commands.run("sleep 1000", background=True)
    paused.pause()
    running = code_interpreter.Sandbox.create(timeout=600)
    assert running.run_code("x = 41").error is None
    running.files.write("/home/user/r.txt", "running at SIGTERM")
    snapshot = running.create_snapshot()
    killed = Sandbox.create(timeout=600)
    killed.kill()
    short = Sandbox.create(timeout=2)
    deadline = time.monotonic() + 60
    while short.sandbox_id not in node.ends() and time.monotonic() < deadline:
        time.sleep(0.5)

    node.stop()  # SIGTERM: `running` is paused into the state dir
    node.start()

    listed = {s.sandbox_id: getattr(s.state, "value", s.state) for s in _all(Sandbox.list())}
    assert listed.get(paused.sandbox_id) == "paused", listed
    assert listed.get(running.sandbox_id) == "paused", listed
    # paused by the shutdown: its next call resumes it, with its interpreter's variables
    assert running.run_code("x + 1").text == "42"
    assert running.files.read("/home/user/r.txt") == "running at SIGTERM"
    # paused by its client: connect resumes it, with its files and its background command
    resumed = Sandbox.connect(paused.sandbox_id, timeout=120)
    assert resumed.files.read("/home/user/kept.txt") == "written before the restart"
    assert sleeper.pid in [p.pid for p in resumed.commands.list()]
    # the named snapshot outlived the restart and starts sandboxes
    assert snapshot.snapshot_id in [s.snapshot_id for s in _all(Sandbox.list_snapshots())]
    child = code_interpreter.Sandbox.create(snapshot.snapshot_id, timeout=120)
    assert child.files.read("/home/user/r.txt") == "running at SIGTERM"
    assert child.run_code("x").text == "41"  # the snapshot's interpreter, kept with its record
    child.kill()

    ends = node.ends()
    assert ends[killed.sandbox_id]["reason"] == "killed"
    assert ends[short.sandbox_id]["reason"] == "timeout"
    assert ends[child.sandbox_id]["reason"] == "killed"
    assert 'capsa_server_sandbox_ends_total{reason="killed"} 1.0' in str(node.get("/metrics"))
    resumed.pause()
    resumed.kill()
    assert node.ends()[paused.sandbox_id]["reason"] == "paused_then_killed"
    running.kill()


def test_kill_9_records_server_crashed_and_leaves_no_qemu_nor_runtime_dir(node: Node) -> None:
    assert node.server is not None
    keep = Sandbox.create(timeout=600)
    keep.files.write("/home/user/k.txt", "paused before the crash")
    keep.pause()
    doomed = Sandbox.create(timeout=600)
    pid = node.server.process.pid
    qemus = _descendants(pid)
    assert qemus, "no QEMU below the server"
    node.server.process.send_signal(signal.SIGKILL)
    node.server.process.wait(10)
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in qemus) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in qemus if _alive(p)], "QEMU outlived the server by 10 s"

    node.start()
    runtime = [Path(os.environ.get("XDG_RUNTIME_DIR") or "/nonexistent"), Path("/dev/shm"), Path("/tmp")]
    left = [p for base in runtime if base.is_dir() for p in base.glob(f"capsa-{pid}-*")]
    assert not left, left
    ends = node.ends()
    assert ends[doomed.sandbox_id]["reason"] == "server_crashed"
    assert node.get("/capsa/ends", OTHER_KEY) == []  # another tenant's key sees none of them
    again = Sandbox.connect(keep.sandbox_id, timeout=120)
    assert again.files.read("/home/user/k.txt") == "paused before the crash"
    again.kill()
    listing = subprocess.run(
        [sys.executable, "-m", "capsa.cli", "serve", "ends", "--state-dir", str(node.state)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert listing.returncode == 0, listing.stderr
    assert doomed.sandbox_id in listing.stdout and "server_crashed" in listing.stdout


def test_a_guest_that_stops_on_its_own_is_recorded_guest_crashed_with_its_console(node: Node) -> None:
    sandbox = Sandbox.create(timeout=600)
    sandbox.commands.run("echo o > /proc/sysrq-trigger", background=True, user="root")  # powers off
    deadline = time.monotonic() + 60
    while sandbox.sandbox_id not in node.ends() and time.monotonic() < deadline:
        time.sleep(0.5)
    row = node.ends()[sandbox.sandbox_id]
    assert row["reason"] == "guest_crashed", row
    assert "sysrq" in str(row["detail"]).lower(), row  # the console's tail says what happened


def _can_mount_tmpfs(tmp: Path) -> bool:
    target = tmp / "probe"
    target.mkdir()
    done = subprocess.run(["unshare", "-m", "mount", "-t", "tmpfs", "tmpfs", str(target)],
                          check=False, capture_output=True, timeout=30)  # fmt: skip
    return done.returncode == 0


def test_a_full_disk_fails_the_pause_with_507_and_the_sandbox_runs_on(tmp_path: Path) -> None:
    """The state dir on a 24 MiB tmpfs (a mount namespace of the server's own): the pause of a
    guest using more than that fails with HTTP 507 (the SDK raises; a 409 it would read as
    "already paused"), the sandbox keeps running, and no half-written pause is left."""
    if not _can_mount_tmpfs(tmp_path):
        pytest.skip("needs unshare -m and mount (root or a user namespace)")
    state, port = tmp_path / "small", free_port()
    state.mkdir()
    log = tmp_path / "full.log"
    script = (f"mount -t tmpfs -o size=24m tmpfs {state} && exec {sys.executable} -m capsa.cli "
              f"serve --port {port} --memory 256 --state-dir {state}")  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(["unshare", "-m", "sh", "-c", script], stdout=out,
                                   stderr=subprocess.STDOUT, cwd=REPO,
                                   env={**os.environ, "CAPSA_API_KEY": API_KEY})  # fmt: skip
    server = Server(f"http://127.0.0.1:{port}", process, log)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{server.url}/health", timeout=2):
                    break
            except OSError:
                assert process.poll() is None, log.read_text()[-2000:]
                time.sleep(0.2)
        sdk = {"api_url": server.url, "sandbox_url": server.url, "api_key": API_KEY}
        sandbox = Sandbox.create(timeout=300, **sdk)
        sandbox.commands.run("head -c 60000000 /dev/urandom > /home/user/big")
        with pytest.raises(e2b.SandboxException, match=r"507.*No space left"):
            sandbox.pause()
        assert sandbox.commands.run("echo running").stdout == "running\n"
        seen = Path(f"/proc/{process.pid}/root") / str(state).lstrip("/") / "paused"
        assert list(seen.iterdir()) == []
        sandbox.kill()
    finally:
        server.stop()
