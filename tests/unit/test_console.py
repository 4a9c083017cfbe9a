"""Console behaviour against a socketpair standing in for QEMU's serial chardev (no VM)."""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from capsa.console import Console
from capsa.errors import ConsoleTimeoutError, VMExited, VMNotRunning

pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[Console, socket.socket]]:
    host, guest = socket.socketpair()
    guest.setblocking(False)
    console = Console(host, tmp_path / "console.log", buffer_limit=1000)
    yield console, guest
    await console._close()
    guest.close()


async def send(guest: socket.socket, data: bytes) -> None:
    await asyncio.get_running_loop().sock_sendall(guest, data)


async def test_wait_for_consumes_up_to_match(pair: tuple[Console, socket.socket]) -> None:
    console, guest = pair
    await send(guest, b"boot noise\nlogin: rest")
    assert await console.wait_for("login:", timeout=2) == "boot noise\nlogin:"
    assert await console.read_available() == " rest"
    assert await console.read_available(timeout=0.01) == ""


async def test_match_split_across_chunks_and_utf8(pair: tuple[Console, socket.socket]) -> None:
    console, guest = pair
    waiter = asyncio.ensure_future(console.wait_for(re.compile(r"caf\u00e9 \d\d"), timeout=2))
    data = "café 42".encode()
    for i in range(len(data)):
        await send(guest, data[i : i + 1])
        await asyncio.sleep(0)
    assert await waiter == "café 42"
    invalid = b"\xff\xfeok"
    await send(guest, invalid)
    assert (await console.wait_for("ok", timeout=2)).endswith("\ufffd\ufffdok")


async def test_wait_for_any_picks_earliest(pair: tuple[Console, socket.socket]) -> None:
    console, guest = pair
    await send(guest, b"aaa second bbb first")
    assert await console.wait_for_any(["first", "second"], timeout=2) == (1, "aaa second")


async def test_timeout_carries_tail(pair: tuple[Console, socket.socket]) -> None:
    console, guest = pair
    await send(guest, b"line one\nline two\n")
    with pytest.raises(ConsoleTimeoutError) as info:
        await console.wait_for("absent", timeout=0.2)
    assert "line two" in info.value.console_tail and info.value.pattern == "absent"


async def test_flood_is_bounded_and_transcript_complete(pair: tuple[Console, socket.socket]) -> None:
    console, guest = pair
    await send(guest, b"x" * 5000 + b"END")
    await console.wait_for("END", timeout=2)
    assert console.dropped_chars >= 4000  # buffer_limit=1000
    await asyncio.sleep(0.05)
    assert console.transcript_path.read_bytes() == b"x" * 5000 + b"END"


async def test_exec_line_ignores_echo(pair: tuple[Console, socket.socket]) -> None:
    console, guest = pair

    async def fake_shell() -> None:
        loop = asyncio.get_running_loop()
        line = (await loop.sock_recv(guest, 4096)).decode()
        begin = re.search(r'echo C""(APSA_B_\w+);', line)
        end = re.search(r'echo C""(APSA_E_\w+)$', line.strip())
        assert begin and end
        # A tty echoes the typed line first, then the output follows with CRLF endings.
        out = (
            line.replace("\n", "\r\n") + f"C{begin.group(1)}\r\nhello\r\nworld\r\nC{end.group(1)}\r\n# "
        )
        await loop.sock_sendall(guest, out.encode())

    shell = asyncio.ensure_future(fake_shell())
    assert await console.exec_line("echo hello; echo world", timeout=2) == "hello\nworld\n"
    await shell
    with pytest.raises(ValueError):
        await console.exec_line("two\nlines")


async def test_exit_wakes_waiters_and_blocks_writes(pair: tuple[Console, socket.socket]) -> None:
    console, _guest = pair
    waiter = asyncio.ensure_future(console.wait_for("never", timeout=5))
    await asyncio.sleep(0.05)
    console._mark_exited(lambda: VMExited("gone", exit_code=0))
    with pytest.raises(VMExited):
        await waiter
    with pytest.raises(VMNotRunning):
        await console.write("x")


async def test_write_reaches_guest(pair: tuple[Console, socket.socket]) -> None:
    console, guest = pair
    await console.write_line("ls")
    await console.send_interrupt()
    await asyncio.sleep(0.05)
    assert guest.recv(100) == b"ls\n\x03"


async def test_transcript_is_capped(
    pair: tuple[Console, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    import capsa.console

    console, guest = pair
    monkeypatch.setattr(capsa.console, "TRANSCRIPT_LIMIT", 100)
    await send(guest, b"y" * 300 + b"DONE")
    await console.wait_for("DONE", timeout=2)
    data = console.transcript_path.read_bytes()
    assert data.startswith(b"y" * 100) and b"truncated" in data and len(data) < 200


async def test_tail_keeps_a_kernel_panic_line_ahead_of_its_trace(
    pair: tuple[Console, socket.socket],
) -> None:
    console, guest = pair
    trace = "".join(f"t{i}\n" for i in range(40))
    await send(guest, f"boot\nKernel panic - not syncing: boom\n{trace}end\n".encode())
    await console.wait_for("end", timeout=2)
    tail = console.tail()
    assert tail.startswith("Kernel panic - not syncing: boom") and tail.endswith("end")
    await send(guest, "".join(f"u{i}\n" for i in range(200)).encode())  # long after: plain window
    await console.wait_for("u199", timeout=2)
    assert console.tail().splitlines() == [f"u{i}" for i in range(170, 200)]
