"""``capsa serve`` through the real E2B SDK: ``update_network`` on a live sandbox, the lifecycle
(``on_timeout="pause"`` with and without ``auto_resume``), timeouts past 24 h and
``--max-timeout``, and the faults around them (unknown ids, a resume with every slot taken, a pause
during a busy command). One server for the module: ``--max-sandboxes 2``, a local DNS server that
maps allowed.test to 127.0.0.1 and an echo server there."""

from __future__ import annotations

import os
import signal
import socket
import socketserver
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from dnslib.server import DNSServer

from tests.server.conftest import API_KEY, Server, _Resolver, start_server

e2b = pytest.importorskip("e2b")
from e2b import Sandbox  # noqa: E402

pytestmark = [pytest.mark.vm, pytest.mark.timeout(180)]

MAX_TIMEOUT = 200_000  # over 24 h: timeouts up to it are accepted, longer ones refused


class _Echo(socketserver.StreamRequestHandler):
    """Echoes lines; records that a connection carried a line and when one ended."""

    def handle(self) -> None:
        try:
            while line := self.rfile.readline():
                self.wfile.write(line)
                self.server.accepted.set()  # type: ignore[attr-defined]  # a line: established
        except OSError:
            pass
        self.server.ended.set()  # type: ignore[attr-defined]


@dataclass
class Setup:
    server: Server
    echo: socketserver.ThreadingTCPServer


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        dns_port = probe.getsockname()[1]
    dns = DNSServer(_Resolver(), address="127.0.0.1", port=dns_port)
    dns.start_thread()
    echo = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    echo.daemon_threads = True
    echo.accepted = threading.Event()  # type: ignore[attr-defined]
    echo.ended = threading.Event()  # type: ignore[attr-defined]
    threading.Thread(target=echo.serve_forever, daemon=True).start()
    server = start_server(
        tmp_path_factory.mktemp("serve"),
        *("--max-sandboxes", "2", "--max-timeout", str(MAX_TIMEOUT), "--memory", "256"),
        *("--dns-server", f"127.0.0.1:{dns_port}", "--allow-internal-destinations"),
    )
    old = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    try:
        yield Setup(server, echo)
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        code = server.stop()
        echo.shutdown()
        echo.server_close()
        dns.stop()
        assert code in (0, -signal.SIGTERM), server.log.read_text()[-3000:]


def _wait_state(sandbox_id: str, state: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while Sandbox.get_info(sandbox_id).state.value != state:
        assert time.monotonic() < deadline, f"{sandbox_id} never became {state}"
        time.sleep(0.3)


HOLD = """
import socket, sys, time
conn = socket.create_connection(("allowed.test", int(sys.argv[1])), timeout=10)
conn.sendall(b"ping\\n")
assert conn.recv(100) == b"ping\\n"
conn.settimeout(60)
print("held", flush=True)
started = time.monotonic()
try:
    print("recv", conn.recv(100), flush=True)
except OSError as exc:
    print("ended", type(exc).__name__, round(time.monotonic() - started, 1), flush=True)
"""

CONNECT = """
import socket, sys
try:
    socket.create_connection(("allowed.test", int(sys.argv[1])), timeout=10).close()
    print("connected")
except OSError as exc:
    print(type(exc).__name__)
"""


def test_update_network_resets_live_connections_and_judges_new_ones(setup: Setup) -> None:
    port = setup.echo.server_address[1]
    sandbox = Sandbox.create(timeout=120, allow_internet_access=True)
    try:
        sandbox.files.write("/tmp/hold.py", HOLD)
        sandbox.files.write("/tmp/connect.py", CONNECT)
        setup.echo.accepted.clear()  # type: ignore[attr-defined]
        setup.echo.ended.clear()  # type: ignore[attr-defined]
        hold = sandbox.commands.run(f"python3 /tmp/hold.py {port}", background=True)
        assert setup.echo.accepted.wait(60)  # type: ignore[attr-defined]
        sandbox.update_network({"deny_out": ["allowed.test"]})
        assert setup.echo.ended.wait(10)  # type: ignore[attr-defined]  # host side closed
        result = hold.wait()
        lines = result.stdout.split("\n")
        assert lines[0] == "held" and lines[1].startswith("ended ConnectionResetError"), result
        assert float(lines[1].split()[2]) < 30  # a reset, not the guest's own timeout
        again = sandbox.commands.run(f"python3 /tmp/connect.py {port}")
        assert again.stdout.strip() == "gaierror"  # the name is denied: NXDOMAIN
        sandbox.update_network({"allow_internet_access": False})  # deny all
        assert sandbox.commands.run(f"python3 /tmp/connect.py {port}").stdout.strip() == "gaierror"
        sandbox.update_network({})  # everything cleared: allow all again
        assert sandbox.commands.run(f"python3 /tmp/connect.py {port}").stdout.strip() == "connected"
        with pytest.raises(e2b.SandboxException, match="400: invalid network entry"):
            sandbox.update_network({"allow_out": ["not a domain!"]})
    finally:
        Sandbox.kill(sandbox.sandbox_id)


def test_update_network_bad_input(setup: Setup) -> None:
    with pytest.raises(e2b.SandboxNotFoundException):
        Sandbox.update_network("inosuchsandbox", {"deny_out": ["0.0.0.0/0"]})
    sandbox = Sandbox.create(timeout=60)  # no network settings: no interface to update
    try:
        with pytest.raises(e2b.SandboxException, match="without network settings"):
            sandbox.update_network({"deny_out": ["0.0.0.0/0"]})
    finally:
        Sandbox.kill(sandbox.sandbox_id)


def test_on_timeout_pause_and_auto_resume(setup: Setup) -> None:
    sandbox = Sandbox.create(timeout=4, lifecycle={"on_timeout": "pause", "auto_resume": True})
    try:
        sandbox.files.write("/root/kept.txt", "survives the timeout")
        sandbox.commands.run("echo in-memory > /dev/shm/kept")
        _wait_state(sandbox.sandbox_id, "paused")
        info = Sandbox.get_info(sandbox.sandbox_id)
        assert info.lifecycle == {"on_timeout": "pause", "auto_resume": True}
        # a call without the sandbox's token is refused and wakes nothing (its slot stays free)
        stranger = urllib.request.Request(
            f"{setup.server.url}/health",
            headers={"E2b-Sandbox-Id": sandbox.sandbox_id, "X-Access-Token": "not-the-token"},
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(stranger, timeout=30)
        assert refused.value.code == 401
        assert Sandbox.get_info(sandbox.sandbox_id).state.value == "paused"
        # the next envd call resumes it, transparently
        kept = sandbox.commands.run("cat /root/kept.txt /dev/shm/kept", user="root")  # /root is 0700
        assert kept.stdout == ("survives the timeout" + "in-memory\n")
        assert Sandbox.get_info(sandbox.sandbox_id).state.value == "running"
        sandbox.set_timeout(60)  # and it runs on, for the timeout set now
        assert sandbox.files.read("/root/kept.txt") == "survives the timeout"
    finally:
        Sandbox.kill(sandbox.sandbox_id)


def test_on_timeout_pause_without_auto_resume(setup: Setup) -> None:
    sandbox = Sandbox.create(timeout=3, lifecycle={"on_timeout": "pause"})
    try:
        sandbox.files.write("/root/kept.txt", "still here")
        _wait_state(sandbox.sandbox_id, "paused")
        with pytest.raises(e2b.SandboxNotRunningException, match="paused"):
            sandbox.commands.run("true")
        with pytest.raises(e2b.SandboxNotRunningException):
            sandbox.files.read("/root/kept.txt")
        assert not sandbox.is_running()
        assert Sandbox.get_info(sandbox.sandbox_id).state.value == "paused"  # nothing resumed it
        resumed = Sandbox.connect(sandbox.sandbox_id, timeout=60)  # an explicit resume works
        assert resumed.files.read("/root/kept.txt") == "still here"
    finally:
        Sandbox.kill(sandbox.sandbox_id)


def test_lifecycle_bad_input(setup: Setup) -> None:
    with pytest.raises(e2b.InvalidArgumentException):  # the SDK's own check
        Sandbox.create(lifecycle={"on_timeout": "kill", "auto_resume": True})
    with pytest.raises(e2b.InvalidArgumentException):  # the SDK's own check, and the server's:
        Sandbox.create(lifecycle={"on_timeout": {"action": "pause", "mode": "filesystem"},
                                  "auto_resume": True})  # fmt: skip
    body = {"templateID": "base", "autoPause": True, "autoPauseMemory": False,
            "autoResume": {"enabled": True}}  # fmt: skip
    reply = httpx.post(f"{setup.server.url}/sandboxes", json=body, headers={"X-API-KEY": API_KEY})
    assert reply.status_code == 400 and "filesystem-only" in reply.text, reply.text


def test_timeouts_past_24_hours_and_max_timeout(setup: Setup) -> None:
    sandbox = Sandbox.create(timeout=100_000)  # more than 24 h
    try:
        info = Sandbox.get_info(sandbox.sandbox_id)
        assert 99_000 < (info.end_at - info.started_at).total_seconds() <= 100_001
        with pytest.raises(e2b.SandboxException, match=r"400: timeout .*--max-timeout"):
            sandbox.set_timeout(MAX_TIMEOUT + 1)
        sandbox.set_timeout(MAX_TIMEOUT)
    finally:
        Sandbox.kill(sandbox.sandbox_id)
    with pytest.raises(e2b.SandboxException, match=r"400: timeout .*--max-timeout"):
        Sandbox.create(timeout=MAX_TIMEOUT + 1)


def test_resume_with_every_slot_taken_is_429_and_unknown_ids(setup: Setup) -> None:
    paused = Sandbox.create(timeout=120)
    running: list[Sandbox] = []
    try:
        paused.files.write("/root/kept.txt", "waits")
        paused.pause()  # gives its running slot back: two more may run
        running = [Sandbox.create(timeout=120) for _ in range(2)]
        with pytest.raises(e2b.RateLimitException, match="max-sandboxes"):
            Sandbox.connect(paused.sandbox_id, timeout=60)
        assert Sandbox.get_info(paused.sandbox_id).state.value == "paused"  # still, and intact
        Sandbox.kill(running.pop().sandbox_id)
        resumed = Sandbox.connect(paused.sandbox_id, timeout=60)
        assert resumed.files.read("/root/kept.txt") == "waits"
    finally:
        for sandbox in (paused, *running):
            Sandbox.kill(sandbox.sandbox_id)
    for call in (
        lambda: Sandbox.connect("inosuchsandbox"),
        lambda: Sandbox.pause("inosuchsandbox"),  # type: ignore[call-arg]
        lambda: Sandbox.set_timeout("inosuchsandbox", 60),
    ):
        with pytest.raises(e2b.SandboxNotFoundException):
            call()


def test_pause_during_a_busy_command(setup: Setup) -> None:
    """A pause while a command runs and a client streams its output: the stream ends with an error
    saying the sandbox was paused; the command goes on after the resume and can be killed."""
    sandbox = Sandbox.create(timeout=120)
    try:
        sandbox.files.write("/root/kept.txt", "kept")
        busy = sandbox.commands.run("echo started; sleep 600", background=True)
        sandbox.pause()
        with pytest.raises(Exception, match="the sandbox was paused"):
            busy.wait()
        resumed = Sandbox.connect(sandbox.sandbox_id, timeout=60)
        assert resumed.files.read("/root/kept.txt") == "kept"
        procs = resumed.commands.run("cat /proc/[0-9]*/cmdline 2>/dev/null; true").stdout
        assert "sleep\x00600" in procs  # it survived the pause
        assert busy.pid in [p.pid for p in resumed.commands.list()]
        assert resumed.commands.kill(busy.pid)
        procs = resumed.commands.run("cat /proc/[0-9]*/cmdline 2>/dev/null; true").stdout
        assert "sleep\x00600" not in procs  # killed: nothing left behind in the guest
    finally:
        Sandbox.kill(sandbox.sandbox_id)
    assert not Sandbox.list().next_items()  # nothing left behind
