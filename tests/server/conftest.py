"""A real ``capsa serve`` on 127.0.0.1 (one per test module), driven through the real E2B SDKs."""

from __future__ import annotations

import os
import signal
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from dnslib import QTYPE, RR, A
from dnslib.server import BaseResolver, DNSServer

API_KEY = "capsa-test-key"
REPO = Path(__file__).resolve().parents[2]


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log: Path
    http_port: int = 0  # a local HTTP server the network tests reach as allowed.test/denied.test

    def env(self, key: str = API_KEY) -> dict[str, str]:
        return {"E2B_API_URL": self.url, "E2B_SANDBOX_URL": self.url, "E2B_API_KEY": key}

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                return self.process.wait(10)
        return self.process.returncode


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(
    tmp: Path,
    *args: str,
    env: dict[str, str] | None = None,
    ca: Path | None = None,
    port: int | None = None,
) -> Server:
    """A ``capsa serve`` on a free port (or ``port``), healthy, with its own state dir; ``ca``: it
    serves HTTPS with a certificate from this CA (``--tls auto`` writes it at start)."""
    port = port or free_port()
    log = tmp / f"serve-{port}.log"
    if "--state-dir" not in args:  # each server its own (the default one admits one server)
        args = (*args, "--state-dir", str(tmp / f"state-{port}"))
    env = {**os.environ, "CAPSA_API_KEY": API_KEY, **(env or {})}
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "capsa.cli", "serve", "--port", str(port), "--memory", "384", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
        )
    server = Server(f"{'http' if ca is None else 'https'}://127.0.0.1:{port}", process, log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"capsa serve exited: {log.read_text()[-3000:]}")
        try:
            context = None if ca is None else ssl.create_default_context(cafile=ca)
            with urllib.request.urlopen(f"{server.url}/health", timeout=2, context=context) as reply:
                if reply.status == 200:
                    return server
        except OSError:
            time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"capsa serve did not become healthy: {log.read_text()[-3000:]}")


class _Resolver(BaseResolver):
    def resolve(self, request, handler):  # type: ignore[no-untyped-def]
        reply = request.reply()
        name = str(request.q.qname).rstrip(".").lower()
        if name in ("allowed.test", "denied.test") and request.q.qtype == QTYPE.A:
            reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A("127.0.0.1"), ttl=60))
        return reply


class _Http(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass
        body = b"hello from the host"
        self.wfile.write(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server with a DNS server and an HTTP server on 127.0.0.1 for its sandboxes; at most
    ``MAX_SANDBOXES`` sandboxes (a module may set its own), else 4."""
    max_sandboxes = str(getattr(request.module, "MAX_SANDBOXES", 4))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        dns_port = probe.getsockname()[1]
    dns = DNSServer(_Resolver(), address="127.0.0.1", port=dns_port)
    dns.start_thread()
    http = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Http)
    http.daemon_threads = True
    threading.Thread(target=http.serve_forever, daemon=True).start()
    try:
        srv = start_server(
            tmp_path_factory.mktemp("serve"),
            *("--pool", "base=2", "--pool", "code-interpreter-v1=1", "--max-sandboxes", max_sandboxes),
            *("--dns-server", f"127.0.0.1:{dns_port}", "--allow-internal-destinations"),
        )
    except BaseException:
        http.shutdown()
        dns.stop()
        raise
    srv.http_port = http.server_address[1]
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
        code = srv.stop()
        http.shutdown()
        http.server_close()
        dns.stop()
        assert code in (0, -signal.SIGTERM), srv.log.read_text()[-3000:]  # uvicorn re-raises it
