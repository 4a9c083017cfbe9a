"""``agent.open_connection``: TCP connections to guest ports carried by the agent (no guest network).

One sandbox serves every check (boots are slow under TCG): an echo server in the guest, bytes both
ways, half-close each way, a refused port, many concurrent connections, a reset, and the agent's
connection limit, after which the agent still answers.
"""

from __future__ import annotations

import asyncio
import os

import pytest

import capsa
from capsa.agent.connections import ConnectionRefused

pytestmark = [pytest.mark.vm, pytest.mark.asyncio]

# Echoes until the client half-closes, then writes "bye" and closes; port 7001 resets at once.
ECHO_SERVER = r"""
import resource, socket, struct, threading
resource.setrlimit(resource.RLIMIT_NOFILE, (8192, 8192))
def echo(conn):
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)
        conn.sendall(b"bye")
def serve(port, handler):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port)); s.listen(2048)
    while True:
        conn, _ = s.accept()
        threading.Thread(target=handler, args=(conn,), daemon=True).start()
def reset(conn):
    conn.recv(1)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)); conn.close()
threading.Thread(target=serve, args=(7001, reset), daemon=True).start()
serve(7000, echo)
"""


async def _start_server(sandbox: capsa.Sandbox) -> capsa.Process:
    await sandbox.agent.write_file("/tmp/echo.py", ECHO_SERVER)
    server = await sandbox.agent.exec("python3").arg("/tmp/echo.py").spawn()
    for _ in range(200):
        try:
            _reader, writer = await sandbox.agent.open_connection(7000, timeout=10)
        except ConnectionRefused:
            await asyncio.sleep(0.1)
            continue
        writer.close()
        await writer.wait_closed()
        return server
    raise AssertionError("the echo server did not start")


@pytest.mark.timeout(300)
async def test_open_connection(sandbox: capsa.Sandbox) -> None:
    agent = sandbox.agent
    # nothing listens: a prompt, clear error
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(ConnectionRefused) as refused:
        await agent.open_connection(9, timeout=10)
    assert loop.time() - started < 5 and "refused" in str(refused.value).lower()
    with pytest.raises(capsa.ConfigError):
        await agent.open_connection(70000)

    server = await _start_server(sandbox)
    try:
        # bytes both ways, more than one window's worth, then a half-close
        reader, writer = await agent.open_connection(7000)
        assert writer.get_extra_info("peername") == ("127.0.0.1", 7000)
        payload = os.urandom(20 << 20)

        async def send() -> None:
            writer.write(payload)
            await writer.drain()
            writer.write_eof()

        sender = asyncio.create_task(send())
        echoed = await reader.readexactly(len(payload))
        await sender
        assert echoed == payload
        assert await reader.read() == b"bye"  # the server saw our EOF, answered, closed
        assert reader.at_eof()
        writer.close()
        await writer.wait_closed()

        # many at once, each its own stream
        async def one(i: int) -> bytes:
            r, w = await agent.open_connection(7000)
            w.write(f"hello {i}\n".encode())
            await w.drain()
            line = await r.readline()
            w.close()
            await w.wait_closed()
            return line

        lines = await asyncio.gather(*(one(i) for i in range(64)))
        assert lines == [f"hello {i}\n".encode() for i in range(64)]

        # a reset by the guest server reaches the reader as an error, not a clean end
        reader, writer = await agent.open_connection(7001)
        writer.write(b"x")
        await writer.drain()
        with pytest.raises(ConnectionResetError):
            await reader.read()
        writer.close()

        # the agent's limit: past it a clear error, and the agent keeps serving
        held = []
        with pytest.raises(capsa.AgentError) as too_many:
            for _ in range(1100):
                held.append(await agent.open_connection(7000))
        assert "too many connections" in str(too_many.value) and "1024" in str(too_many.value)
        assert len(held) == 1024
        for _, w in held:
            w.close()
        await asyncio.gather(*(w.wait_closed() for _, w in held))
        await agent.ping()
        r, w = await agent.open_connection(7000)  # the slots came back
        w.write(b"again")
        w.write_eof()
        assert await r.read() == b"againbye"
        w.close()
    finally:
        await server.kill()
