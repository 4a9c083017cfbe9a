"""Attacks on ``capsa serve``'s HTTP surface that exhaust it or break it with malformed input, with a
key or without: slow and endless requests, oversized bodies, stalled stream readers, and the small
parse holes that answered 500 or let a client write the access log. One server for the module
(short timeouts, a small upload cap, one pooled sandbox)."""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import json
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.server.conftest import API_KEY, Server, start_server

pytestmark = [pytest.mark.vm, pytest.mark.timeout(150)]

HEADER_TIMEOUT = 2.0
BODY_TIMEOUT = 3.0
UPLOAD_MB = 8
STREAM = "application/connect+json"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(
        tmp_path_factory.mktemp("limits"),
        *("--pool", "base=1", "--memory", "256", "--max-upload-mb", str(UPLOAD_MB)),
        *("--header-timeout", str(HEADER_TIMEOUT), "--body-timeout", str(BODY_TIMEOUT)),
    )
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def sandbox(server: Server) -> Iterator[dict[str, Any]]:
    reply = httpx.post(
        f"{server.url}/sandboxes", headers={"X-API-KEY": API_KEY}, json={"timeout": 600}, timeout=120
    )
    assert reply.status_code == 201, reply.text
    info = reply.json()
    yield info
    httpx.delete(f"{server.url}/sandboxes/{info['sandboxID']}", headers={"X-API-KEY": API_KEY})


def _envd(info: dict[str, Any], **extra: str) -> dict[str, str]:
    return {"E2b-Sandbox-Id": info["sandboxID"], "X-Access-Token": info["envdAccessToken"], **extra}


def _envelope(message: dict[str, Any]) -> bytes:
    body = json.dumps(message).encode()
    return struct.pack(">BI", 0, len(body)) + body


def _run(server: Server, info: dict[str, Any], command: str) -> str:
    """Run ``command`` to its end through the Connect stream; its stdout."""
    request = {"process": {"cmd": "/bin/bash", "args": ["-c", command]}}
    reply = httpx.post(
        f"{server.url}/process.Process/Start",
        content=_envelope(request),
        headers=_envd(info, **{"content-type": STREAM}),
        timeout=120,
    )
    out = b""
    for frame in _frames(reply.content):
        data = frame.get("event", {}).get("data", {})
        out += base64.b64decode(data.get("stdout", ""))
    return out.decode()


def _frames(raw: bytes) -> Iterator[dict[str, Any]]:
    offset = 0
    while offset + 5 <= len(raw):
        _, length = struct.unpack_from(">BI", raw, offset)
        yield json.loads(raw[offset + 5 : offset + 5 + length])
        offset += 5 + length


def _rss(server: Server) -> int:
    for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _raw(server: Server, data: bytes, wait: float = 10.0) -> bytes:
    """Send ``data`` on a fresh connection and return what comes back before it closes or
    ``wait`` seconds pass."""
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        sock.sendall(data)
        reply = b""
        try:
            while chunk := sock.recv(65536):
                reply += chunk
        except TimeoutError:
            pass
        return reply


# -- connections --


@pytest.mark.timeout(60)
def test_slowloris_connections_are_closed_while_health_answers(server: Server) -> None:
    """Slowloris: 200 connections trickle an unfinished request head a byte at a time; each is
    closed once the header deadline passes, and a normal client is served meanwhile."""
    port = int(server.url.rsplit(":", 1)[1])

    async def attack() -> tuple[list[float], list[float]]:
        async def slow() -> float:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            started = time.monotonic()
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            try:
                for _ in range(40):  # 20 s of one header byte every 0.5 s
                    writer.write(b"X")
                    await writer.drain()
                    try:
                        if await asyncio.wait_for(reader.read(4096), 0.5) == b"":
                            break
                    except TimeoutError:
                        continue
                    break  # answered (a 408) or closed
            except OSError:
                pass
            finally:
                writer.close()
            return time.monotonic() - started

        async def health() -> list[float]:
            times = []
            async with httpx.AsyncClient() as client:
                for _ in range(10):
                    await asyncio.sleep(0.3)
                    started = time.monotonic()
                    reply = await client.get(f"{server.url}/health", timeout=5)
                    assert reply.status_code == 200
                    times.append(time.monotonic() - started)
            return times

        slow_tasks = [asyncio.create_task(slow()) for _ in range(200)]
        health_times = await health()
        return list(await asyncio.gather(*slow_tasks)), health_times

    held, health_times = asyncio.run(attack())
    assert max(held) < HEADER_TIMEOUT + 3, f"a slow connection was held {max(held):.1f}s"
    assert max(health_times) < 2.0


# -- bodies --


def test_declared_oversized_body_is_refused_before_it_is_sent(server: Server) -> None:
    """Body flood: a control request declaring 2 GiB is answered 413 at once, unread."""
    head = (
        b"POST /sandboxes HTTP/1.1\r\nHost: x\r\nX-API-KEY: " + API_KEY.encode() + b"\r\n"
        b"Content-Type: application/json\r\nContent-Length: 2147483648\r\n\r\n"
    )
    started = time.monotonic()
    reply = _raw(server, head, wait=5)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert time.monotonic() - started < 3


def test_chunked_body_over_the_json_cap_gets_413(server: Server) -> None:
    """Body flood without a length: 3 MiB of chunked JSON to the control plane stops at the cap."""

    def body() -> Iterator[bytes]:
        yield b'{"metadata": {"a": "'
        for _ in range(48):
            yield b"x" * 65536
        yield b'"}}'

    reply = httpx.post(
        f"{server.url}/sandboxes", headers={"X-API-KEY": API_KEY}, content=body(), timeout=30
    )
    assert reply.status_code == 413, reply.text


def test_trickled_body_gets_408(server: Server) -> None:
    """Slow POST (R.U.D.Y.): a body that stops arriving is answered 408 after the body timeout."""
    head = (
        b"POST /sandboxes HTTP/1.1\r\nHost: x\r\nX-API-KEY: " + API_KEY.encode() + b"\r\n"
        b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
    )
    started = time.monotonic()
    reply = _raw(server, head, wait=BODY_TIMEOUT + 5)
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert time.monotonic() - started < BODY_TIMEOUT + 3


def test_uploads_stream_within_the_cap_and_413_past_it(server: Server, sandbox: dict[str, Any]) -> None:
    """Upload flood: a multipart upload past --max-upload-mb gets 413; one within it arrives
    intact (streamed to the guest part by part)."""
    small = bytes(range(256)) * (3 << 12)  # 3 MiB
    reply = httpx.post(
        f"{server.url}/files",
        params={"path": "/tmp/up.bin"},
        files={"file": ("/tmp/up.bin", small)},
        headers=_envd(sandbox),
        timeout=60,
    )
    assert reply.status_code == 200, reply.text
    back = httpx.get(
        f"{server.url}/files", params={"path": "/tmp/up.bin"}, headers=_envd(sandbox), timeout=60
    )
    assert back.content == small

    def big() -> Iterator[bytes]:
        for _ in range(UPLOAD_MB + 4):
            yield b"\0" * (1 << 20)

    reply = httpx.post(
        f"{server.url}/files",
        params={"path": "/tmp/big.bin"},
        content=big(),
        headers=_envd(sandbox, **{"content-type": "application/octet-stream"}),
        timeout=60,
    )
    assert reply.status_code == 413, reply.text


def test_gzip_upload_bomb_gets_413(server: Server, sandbox: dict[str, Any]) -> None:
    """Gzip bomb: a ~12 KiB ``Content-Encoding: gzip`` upload (what the SDKs' ``gzip=True``
    sends) that inflates past --max-upload-mb is refused with 413, not written out in full; a
    gzipped upload within the cap arrives inflated."""
    headers = _envd(sandbox, **{"content-type": "application/octet-stream", "content-encoding": "gzip"})
    reply = httpx.post(
        f"{server.url}/files",
        params={"path": "/tmp/gz.txt"},
        content=gzip.compress(b"small and gzipped " * 1000),
        headers=headers,
        timeout=60,
    )
    assert reply.status_code == 200, reply.text
    assert _run(server, sandbox, "md5sum < /tmp/gz.txt").split()[0] == (
        hashlib.md5(b"small and gzipped " * 1000).hexdigest()
    )
    bomb = gzip.compress(b"\0" * ((UPLOAD_MB + 4) << 20), compresslevel=9)
    assert len(bomb) < 64 << 10
    reply = httpx.post(
        f"{server.url}/files",
        params={"path": "/tmp/bomb.bin"},
        content=bomb,
        headers=headers,
        timeout=60,
    )
    assert reply.status_code == 413, reply.text


# -- streams --


def test_stalled_stream_reader_holds_back_the_guest_not_server_memory(
    server: Server, sandbox: dict[str, Any]
) -> None:
    """Stalled reader: a client starts a command that prints 300 MiB and stops reading; the
    server's memory stays flat and the command is held back (it has not finished)."""
    before = _rss(server)
    request = {
        "process": {"cmd": "/bin/bash", "args": ["-c", "head -c 300M /dev/zero; echo done >/tmp/flood"]}
    }
    with (
        httpx.Client(timeout=30) as client,
        client.stream(
            "POST",
            f"{server.url}/process.Process/Start",
            content=_envelope(request),
            headers=_envd(sandbox, **{"content-type": STREAM}),
        ) as reply,
    ):
        assert reply.status_code == 200
        chunks = reply.iter_raw(1024)  # kept: a dropped iterator would close the response
        next(chunks)  # the stream is up; now stop reading
        peak = before
        for _ in range(20):
            time.sleep(0.5)
            peak = max(peak, _rss(server))
        finished = _run(server, sandbox, "cat /tmp/flood 2>/dev/null || echo running")
        assert next(chunks)  # still streaming: held back, not cut off
    _run(server, sandbox, "pkill -f 'head -c 300M' || true")
    assert peak - before < 64 << 20, f"server RSS grew {(peak - before) >> 20} MiB"
    assert finished.strip() == "running"


def test_download_is_streamed_not_loaded(server: Server, sandbox: dict[str, Any]) -> None:
    """Download flood: GET /files of a 300 MiB file by a client that does not read does not load
    the file into the server."""
    _run(server, sandbox, "truncate -s 300M /tmp/sparse")
    before = _rss(server)
    with (
        httpx.Client(timeout=30) as client,
        client.stream(
            "GET", f"{server.url}/files", params={"path": "/tmp/sparse"}, headers=_envd(sandbox)
        ) as reply,
    ):
        assert reply.status_code == 200
        chunks = reply.iter_raw(1024)
        next(chunks)
        peak = before
        for _ in range(10):
            time.sleep(0.5)
            peak = max(peak, _rss(server))
        assert next(chunks)  # still streaming
    assert peak - before < 64 << 20, f"server RSS grew {(peak - before) >> 20} MiB"


# -- malformed input --


def test_non_ascii_access_token_is_not_a_500(server: Server, sandbox: dict[str, Any]) -> None:
    """Header fuzz: a non-ASCII X-Access-Token used to raise in compare_digest (500 + traceback)."""
    headers = [("E2b-Sandbox-Id", sandbox["sandboxID"]), ("X-Access-Token", "t\u00e9st".encode())]
    for path in ("/health", "/files?path=/etc/hostname"):
        reply = httpx.get(f"{server.url}{path}", headers=headers)
        assert 400 <= reply.status_code < 500, reply.text


def test_duplicated_sandbox_id_is_refused(server: Server, sandbox: dict[str, Any]) -> None:
    """Routing confusion: two E2b-Sandbox-Id headers were served for the first and logged under
    the last; now the request is refused."""
    headers = [
        ("E2b-Sandbox-Id", sandbox["sandboxID"]),
        ("E2b-Sandbox-Id", "someone-else"),
        ("X-Access-Token", sandbox["envdAccessToken"]),
    ]
    reply = httpx.get(f"{server.url}/health", headers=headers)
    assert reply.status_code == 400
    ports = [*_envd(sandbox).items(), ("E2b-Sandbox-Port", "49983"), ("E2b-Sandbox-Port", "49999")]
    assert httpx.get(f"{server.url}/health", headers=ports).status_code == 400


def test_access_log_lines_cannot_be_forged(server: Server) -> None:
    """Log injection: a %0a in the path (or a newline in a sandbox id) started a forged line."""
    httpx.get(f"{server.url}/x%0aINFO:capsa.server.access:FORGED%0d")
    httpx.get(f"{server.url}/health", headers={"E2b-Sandbox-Id": "a\tFORGED"})
    deadline = time.monotonic() + 5
    text = ""
    while time.monotonic() < deadline and "FORGED" not in text:
        text = server.log.read_text(errors="replace")
        time.sleep(0.1)
    assert "FORGED" in text
    for line in text.splitlines():
        assert not line.startswith("INFO:capsa.server.access:FORGED"), line
        assert "\t" not in line and "\r" not in line, repr(line)


def test_list_dir_depth_is_bounded(server: Server, sandbox: dict[str, Any]) -> None:
    """Recursion bomb: ListDir with depth 100000 on a 1200-level tree recursed past Python's
    limit (a 500); the depth is now capped and the walk does not recurse."""
    _run(server, sandbox, "p=/tmp/deep; for i in $(seq 1200); do p=$p/d; done; mkdir -p $p")
    url = f"{server.url}/filesystem.Filesystem/ListDir"
    reply = httpx.post(
        url, json={"path": "/tmp/deep", "depth": 100000}, headers=_envd(sandbox), timeout=120
    )
    assert reply.status_code == 400, reply.text[:300]
    reply = httpx.post(url, json={"path": "/tmp/deep", "depth": 32}, headers=_envd(sandbox), timeout=60)
    assert reply.status_code == 200
    assert len(reply.json()["entries"]) == 32


def test_malformed_bodies_never_answer_500(server: Server, sandbox: dict[str, Any]) -> None:
    """Parser fuzz: non-object JSON, wrong types and junk on every JSON route answer 4xx, never a
    500 (``/execute`` with a JSON array used to)."""
    bodies: list[Any] = [
        [],
        [1, 2],
        "text",
        3,
        None,
        {"code": []},
        {"process": []},
        {"process": {"cmd": "true", "args": "x", "envs": []}},
        {"process": {"pid": "abc"}, "signal": []},
        {"input": []},
        {"process": {"pid": 1}, "input": {"stdin": "!!not base64"}},
        {"context_id": ["x"], "code": "1"},
        {"code": "1", "env_vars": [1]},
        {"path": []},
        {"path": "/", "depth": "deep"},
        {"cwd": 5},
    ]
    envd = _envd(sandbox)
    interp = {
        **envd,
        "E2b-Sandbox-Port": "49999",
        "E2b-Traffic-Access-Token": sandbox["envdAccessToken"],
    }
    targets = [
        ("/execute", interp),
        ("/contexts", interp),
        ("/process.Process/SendSignal", envd),
        ("/process.Process/SendInput", envd),
        ("/process.Process/Start", {**envd, "content-type": STREAM}),
        ("/filesystem.Filesystem/ListDir", envd),
        ("/filesystem.Filesystem/Stat", envd),
    ]
    failures = []
    for path, headers in targets:
        for body in [*bodies, b"\xff\xfe not json", b"{" * 5000, b"[" * 200_000]:
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            if headers.get("content-type") == STREAM:  # a streaming RPC: one enveloped message
                content = struct.pack(">BI", 0, len(content)) + content
            reply = httpx.post(
                f"{server.url}{path}",
                content=content,
                headers={"content-type": "application/json", **headers},
                timeout=60,
            )
            internal = '"code":"internal"' in reply.text or '"code":"unknown"' in reply.text
            if (reply.status_code >= 500 and reply.status_code != 501) or internal:
                failures.append((path, content[:60], reply.status_code, reply.text[:120]))
    control = [[], "text", None, {"timeout": "x"}, {"metadata": []}, {"network": []}]
    for body in [*control, b"\xff", b"[" * 200_000]:  # (none of them may create a sandbox)
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        reply = httpx.post(
            f"{server.url}/sandboxes", content=content, headers={"X-API-KEY": API_KEY}, timeout=60
        )
        if reply.status_code >= 500:
            failures.append(("/sandboxes", content[:60], reply.status_code, reply.text[:120]))
    assert not failures, failures


@pytest.mark.timeout(150)
def test_vm_crash_error_carries_no_host_details(server: Server) -> None:
    """Information leak: a sandbox whose VM dies under a running command reported the VMExited
    error with its console tail (host paths) to the client; now the client gets the class only."""
    reply = httpx.post(f"{server.url}/sandboxes", headers={"X-API-KEY": API_KEY}, json={}, timeout=120)
    assert reply.status_code == 201
    info = reply.json()
    try:
        request = {
            "process": {
                "cmd": "/bin/bash",
                "args": ["-c", "sleep 1; echo o > /proc/sysrq-trigger || poweroff -f; sleep 60"],
            }
        }
        reply = httpx.post(
            f"{server.url}/process.Process/Start",
            content=_envelope(request),
            # as root (Basic "root:", as the SDK's user="root"): powering off needs it
            headers=_envd(info, **{"content-type": STREAM, "authorization": "Basic cm9vdDo="}),
            timeout=120,
        )
        text = reply.content.decode(errors="replace")
        assert "error" in text, text[-500:]
        assert "console" not in text and "/tmp" not in text and "qemu" not in text.lower(), text[-800:]
    finally:
        httpx.delete(f"{server.url}/sandboxes/{info['sandboxID']}", headers={"X-API-KEY": API_KEY})
