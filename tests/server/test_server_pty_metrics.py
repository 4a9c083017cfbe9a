"""``capsa serve``'s PTYs (``sandbox.pty``, ``commands.send_stdin``) and guest metrics
(``get_metrics``, the batch endpoint, ``/metrics``) through the real ``e2b`` SDK."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Iterator

import httpx
import pytest

e2b = pytest.importorskip("e2b")

from e2b import (  # noqa: E402
    AsyncSandbox,
    CommandExitException,
    InvalidArgumentException,
    NotFoundException,
    Sandbox,
    SandboxException,
)
from e2b.sandbox.commands.command_handle import PtySize  # noqa: E402

from tests.server.conftest import API_KEY, Server, start_server  # noqa: E402

pytestmark = [pytest.mark.vm, pytest.mark.timeout(180)]

MEMORY_MB = 256
PTY_SHELL = b"/bin/bash\x00-i\x00-l\x00"  # the cmdline of the shell pty.create starts


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(
        tmp_path_factory.mktemp("serve"),
        *("--pool", "base=1", "--max-sandboxes", "3", "--memory", str(MEMORY_MB)),
        *("--metrics-interval", "1"),
    )
    old = {k: os.environ.get(k) for k in srv.env()}
    os.environ.update(srv.env())
    try:
        yield srv
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        srv.stop()


@pytest.fixture(scope="module")
def sandbox_id(served: Server) -> Iterator[str]:
    sandbox = Sandbox.create(timeout=600)
    yield sandbox.sandbox_id
    sandbox.kill()


async def _until(check: Callable[[], bool], what: Callable[[], object], seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out; got {what()!r}")
        await asyncio.sleep(0.05)


def _run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(scenario())


async def _shells(sbx: AsyncSandbox) -> int:
    """How many ``bash -i -l`` (PTY shells) run in the guest."""
    listing = await sbx.commands.run("cat /proc/[0-9]*/cmdline 2>/dev/null; true")
    return listing.stdout.encode().count(PTY_SHELL)


def test_pty_create_input_resize_kill(sandbox_id: str) -> None:
    async def scenario() -> None:
        sbx = await AsyncSandbox.connect(sandbox_id)
        out = bytearray()
        handle = await sbx.pty.create(PtySize(rows=24, cols=80), on_data=out.extend, timeout=60)
        await sbx.pty.send_stdin(handle.pid, b"echo pty-$((6*7))\n")
        await _until(lambda: b"pty-42" in out, lambda: bytes(out))
        await sbx.pty.resize(handle.pid, PtySize(rows=33, cols=101))
        await sbx.pty.send_stdin(handle.pid, b"stty size\n")
        await _until(lambda: b"33 101" in out, lambda: bytes(out))
        # commands.send_stdin reaches a PTY too (its input is the terminal's)
        await sbx.commands.send_stdin(handle.pid, "echo via-$((2+3))-commands\n")
        await _until(lambda: b"via-5-commands" in out, lambda: bytes(out))
        assert handle.pid in [p.pid for p in await sbx.commands.list()]
        assert await sbx.pty.kill(handle.pid)
        with pytest.raises(CommandExitException):
            await handle.wait()
        assert handle.pid not in [p.pid for p in await sbx.commands.list()]
        assert await _shells(sbx) == 0

    _run(scenario)


def test_send_stdin_to_a_plain_process(sandbox_id: str) -> None:
    async def scenario() -> None:
        sbx = await AsyncSandbox.connect(sandbox_id)
        handle = await sbx.commands.run("head -n 2", background=True, stdin=True)
        await sbx.commands.send_stdin(handle.pid, "first\n")
        await sbx.commands.send_stdin(handle.pid, b"second\nthird\n")
        result = await handle.wait()
        assert result.stdout == "first\nsecond\n"

    _run(scenario)


def test_stream_input_to_a_command_and_a_pty(sandbox_id: str) -> None:
    """``commands.stream_input`` / ``pty.stream_input`` (Connect's client-streaming
    ``StreamInput`` over HTTP/1.1): the sync call's chunks arrive in order; the async handle's
    inputs reach the process while its stream stays open; an unknown pid is NotFound."""
    sandbox = Sandbox.connect(sandbox_id)
    handle = sandbox.commands.run("head -n 3", background=True, stdin=True)
    sandbox.commands.stream_input(handle.pid, ["one\n", b"two\n", "three\n", "four\n"])
    assert handle.wait().stdout == "one\ntwo\nthree\n"
    with pytest.raises(NotFoundException):
        sandbox.commands.stream_input(999_999, ["x"])

    async def scenario() -> None:
        sbx = await AsyncSandbox.connect(sandbox_id)
        seen: list[str] = []
        cat = await sbx.commands.run("cat", background=True, stdin=True, on_stdout=seen.append)
        stream = sbx.commands.stream_input(cat.pid)
        await stream.send("first\n")
        await _until(lambda: "first\n" in "".join(seen), lambda: seen)  # before the stream ends
        await stream.send(b"second\n")
        await _until(lambda: "second\n" in "".join(seen), lambda: seen)
        await stream.close()
        await sbx.commands.close_stdin(cat.pid)
        assert (await cat.wait()).stdout == "first\nsecond\n"
        out = bytearray()
        pty = await sbx.pty.create(PtySize(rows=24, cols=80), on_data=out.extend, timeout=60)
        async with sbx.pty.stream_input(pty.pid) as typed:
            await typed.send(b"echo streamed-$((3*3))\n")
            await _until(lambda: b"streamed-9" in out, lambda: bytes(out))
        assert await sbx.pty.kill(pty.pid)
        missing = sbx.commands.stream_input(999_999)
        with pytest.raises(NotFoundException):
            await missing.close()

    _run(scenario)


def test_a_dropped_pty_client_leaves_the_pty_until_its_timeout(sandbox_id: str) -> None:
    """As envd: a PTY outlives the stream that started it (``pty.connect`` reattaches) and is
    killed when its timeout passes; nothing stays behind in the guest."""

    async def scenario() -> None:
        sbx = await AsyncSandbox.connect(sandbox_id)
        first = bytearray()
        handle = await sbx.pty.create(PtySize(rows=24, cols=80), on_data=first.extend, timeout=6)
        await handle.disconnect()  # the client goes away mid-stream
        again = bytearray()
        reattached = await sbx.pty.connect(handle.pid, on_data=again.extend, timeout=30)
        await sbx.pty.send_stdin(handle.pid, b"echo back-$((40+2))\n")
        await _until(lambda: b"back-42" in again, lambda: bytes(again))
        await reattached.disconnect()
        pids = [p.pid for p in await sbx.commands.list()]
        assert handle.pid in pids
        deadline = time.monotonic() + 30  # its 6 s timeout kills it, no client attached
        while handle.pid in pids and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            pids = [p.pid for p in await sbx.commands.list()]
        assert handle.pid not in pids
        assert await _shells(sbx) == 0

    _run(scenario)


def test_pty_bad_input_gets_clear_errors(sandbox_id: str) -> None:
    async def scenario() -> None:
        sbx = await AsyncSandbox.connect(sandbox_id)
        with pytest.raises(NotFoundException):
            await sbx.pty.send_stdin(999_999, b"x")
        with pytest.raises(NotFoundException):
            await sbx.pty.resize(999_999, PtySize(rows=10, cols=10))
        assert not await sbx.pty.kill(999_999)
        with pytest.raises(InvalidArgumentException):
            await sbx.pty.create(PtySize(rows=0, cols=80), on_data=lambda _: None)
        plain = await sbx.commands.run("sleep 30", background=True)
        with pytest.raises(SandboxException, match="PTY"):  # not a terminal: nothing to resize
            await sbx.pty.resize(plain.pid, PtySize(rows=10, cols=10))
        await plain.kill()

    _run(scenario)


def test_get_metrics_has_real_guest_samples(served: Server, sandbox_id: str) -> None:
    sandbox = Sandbox.connect(sandbox_id)
    deadline = time.monotonic() + 30
    metrics = sandbox.get_metrics()
    while len(metrics) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
        metrics = sandbox.get_metrics()
    assert len(metrics) >= 2, metrics
    cpus = int(sandbox.commands.run("nproc").stdout)
    last = metrics[-1]
    assert last.cpu_count == cpus
    assert 0.0 <= last.cpu_used_pct <= 100.0
    assert 0.6 * MEMORY_MB * 2**20 < last.mem_total <= MEMORY_MB * 2**20
    assert 0 < last.mem_used < last.mem_total
    assert 0 <= last.mem_cache < last.mem_total
    assert 0 < last.disk_used <= last.disk_total
    assert abs(last.timestamp.timestamp() - time.time()) < 60
    assert [m.timestamp for m in metrics] == sorted(m.timestamp for m in metrics)
    # start/end select a window (unix seconds)
    future = Sandbox.get_metrics(sandbox_id, start=last.timestamp.replace(year=2100))
    assert future == []
    early = Sandbox.get_metrics(sandbox_id, end=metrics[0].timestamp)
    full = Sandbox.get_metrics(sandbox_id)
    assert 1 <= len(early) < len(full)

    headers = {"X-API-KEY": API_KEY}
    batch = httpx.get(
        f"{served.url}/sandboxes/metrics",
        params={"sandbox_ids": f"{sandbox_id},inosuchsandbox"},
        headers=headers,
    )
    assert batch.status_code == 200, batch.text
    assert set(batch.json()["sandboxes"]) == {sandbox_id}
    assert batch.json()["sandboxes"][sandbox_id]["memTotal"] == last.mem_total
    exported = httpx.get(f"{served.url}/metrics", headers=headers).text
    assert f'capsa_server_sandbox_memory_total_bytes{{sandbox="{sandbox_id}"}}' in exported
    assert f'capsa_server_sandbox_cpu_count{{sandbox="{sandbox_id}"}} {cpus}.0' in exported


def test_metrics_of_unknown_or_removed_sandboxes(served: Server) -> None:
    with pytest.raises(NotFoundException):
        Sandbox.get_metrics("inosuchsandbox")
    headers = {"X-API-KEY": API_KEY}
    assert httpx.get(f"{served.url}/sandboxes/metrics", headers=headers).status_code == 400
    bad = httpx.get(f"{served.url}/sandboxes/x/metrics?start=yesterday", headers=headers)
    assert bad.status_code in (400, 404)
    gone = Sandbox.create(timeout=60)
    deadline = time.monotonic() + 30
    while not gone.get_metrics() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert f'sandbox="{gone.sandbox_id}"' in httpx.get(f"{served.url}/metrics", headers=headers).text
    gone.kill()
    with pytest.raises(NotFoundException):
        Sandbox.get_metrics(gone.sandbox_id)
    assert f'sandbox="{gone.sandbox_id}"' not in httpx.get(f"{served.url}/metrics", headers=headers).text
