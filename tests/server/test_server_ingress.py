"""Ingress (``get_host(port)``): HTTP and WebSocket traffic to a port of a sandbox, through
``capsa serve`` and the guest agent, driven by the real E2B SDK (for create and commands) and plain
HTTP / WebSocket clients on 127.0.0.1 with the ``Host`` header a browser would send."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator

import httpx
import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage

e2b = pytest.importorskip("e2b")

from e2b import Sandbox  # noqa: E402

from tests.server.conftest import API_KEY, Server, start_server  # noqa: E402

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300)]

IDLE_CONNECTIONS = 1000

# Python stdlib only: 8001 echoes POST bodies (chunked or not) and streams /stream in chunks, 8002
# is a minimal WebSocket echo server, 8003 accepts connections and never answers.
GUEST_SERVERS = r"""
import base64, hashlib, http.server, resource, socket, struct, threading
resource.setrlimit(resource.RLIMIT_NOFILE, (8192, 8192))

class Echo(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    break
                parts.append(self.rfile.read(size)); self.rfile.readline()
            body = b"".join(parts)
        else:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Chunked", self.headers.get("Transfer-Encoding", "no"))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        if self.path == "/forever":  # streams until the client goes away
            self.send_response(200)
            self.send_header("Content-Length", str(1 << 40))
            self.end_headers()
            chunk = b"x" * 65536
            while True:
                self.wfile.write(chunk)
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for i in range(5):
            data = f"part {i};".encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data)); self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")
    def log_message(self, *args):
        pass

def ws_client(conn):
    head = b""
    while b"\r\n\r\n" not in head:
        head += conn.recv(4096)
    key = [l.split(b":", 1)[1].strip() for l in head.split(b"\r\n") if l.lower().startswith(b"sec-websocket-key")][0]
    accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
    conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
    f = conn.makefile("rb")
    while True:
        b0, b1 = f.read(2)
        op, n = b0 & 15, b1 & 127
        if n == 126: n = struct.unpack(">H", f.read(2))[0]
        elif n == 127: n = struct.unpack(">Q", f.read(8))[0]
        mask = f.read(4)
        data = bytes(c ^ mask[i % 4] for i, c in enumerate(f.read(n)))
        if op == 8:
            conn.sendall(b"\x88\x02" + data[:2]); conn.close(); return
        reply = b"echo: " + data
        size = bytes([len(reply)]) if len(reply) < 126 else b"\x7e" + struct.pack(">H", len(reply))
        conn.sendall(bytes([0x80 | op]) + size + reply)

def serve(port, handler):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port)); s.listen(4096)
    held = []
    while True:
        conn, _ = s.accept()
        if handler is None:
            held.append(conn)
        else:
            threading.Thread(target=handler, args=(conn,), daemon=True).start()

threading.Thread(target=serve, args=(8002, ws_client), daemon=True).start()
threading.Thread(target=serve, args=(8003, None), daemon=True).start()
http.server.ThreadingHTTPServer(("127.0.0.1", 8001), Echo).serve_forever()
"""


@pytest.fixture(scope="module")
def ingress_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(
        tmp_path_factory.mktemp("serve"),
        *("--pool", "base=1", "--max-sandboxes", "3", "--max-connections", "1500"),
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


def _wait_ready(url: str, host: str, path: str = "/") -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if httpx.get(f"{url}{path}", headers={"Host": host}, timeout=30).status_code != 502:
            return
        time.sleep(0.2)
    raise AssertionError(f"{host} did not start serving")


@pytest.fixture(scope="module")
def sbx(ingress_server: Server) -> Iterator[Sandbox]:
    sandbox = Sandbox.create(timeout=600)
    sandbox.files.write("/tmp/www/hello.txt", "hello from the sandbox\n")
    sandbox.files.write("/tmp/servers.py", GUEST_SERVERS)
    sandbox.commands.run("python3 -m http.server 8000 --directory /tmp/www", background=True)
    # as root: it raises its open-file limit past the hard one an unprivileged account gets
    sandbox.commands.run("python3 /tmp/servers.py", background=True, user="root")
    _wait_ready(ingress_server.url, sandbox.get_host(8000))
    _wait_ready(ingress_server.url, sandbox.get_host(8001))
    yield sandbox
    sandbox.kill()


def _port_of(server: Server) -> int:
    return int(server.url.rsplit(":", 1)[1])


def test_get_through_host_and_headers(ingress_server: Server, sbx: Sandbox) -> None:
    port = _port_of(ingress_server)
    assert sbx.sandbox_domain == f"localhost:{port}"  # create's reply carries --domain's default
    assert sbx.get_host(8000) == f"8000-{sbx.sandbox_id}.localhost:{port}"
    by_host = httpx.get(f"{ingress_server.url}/hello.txt", headers={"Host": sbx.get_host(8000)})
    assert (by_host.status_code, by_host.text) == (200, "hello from the sandbox\n")
    listing = httpx.get(f"{ingress_server.url}/", headers={"Host": sbx.get_host(8000)})
    assert listing.status_code == 200 and "hello.txt" in listing.text
    headers = {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "8000"}
    by_headers = httpx.get(f"{ingress_server.url}/hello.txt?x=1", headers=headers)
    assert (by_headers.status_code, by_headers.text) == (200, "hello from the sandbox\n")
    head = httpx.head(f"{ingress_server.url}/hello.txt", headers={"Host": sbx.get_host(8000)})
    assert head.status_code == 200 and head.headers["content-length"] == "23"


def test_streamed_bodies_both_ways(ingress_server: Server, sbx: Sandbox) -> None:
    host = {"Host": sbx.get_host(8001)}
    payload = os.urandom(3 << 20)

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(payload), 100_000):
            yield payload[start : start + 100_000]

    chunked = httpx.post(f"{ingress_server.url}/echo", content=chunks(), headers=host, timeout=60)
    assert chunked.status_code == 200 and chunked.headers["x-chunked"] == "chunked"
    assert chunked.content == payload
    plain = httpx.post(f"{ingress_server.url}/echo", content=payload[:1000], headers=host)
    assert (plain.headers["x-chunked"], plain.content) == ("no", payload[:1000])
    with httpx.stream("GET", f"{ingress_server.url}/stream", headers=host) as reply:
        assert reply.status_code == 200
        assert b"".join(reply.iter_bytes()) == b"".join(b"part %d;" % i for i in range(5))


def test_client_dropping_mid_stream_frees_the_guest_connection(
    ingress_server: Server, sbx: Sandbox
) -> None:
    """A client that reads part of an endless download and hangs up: the relay ends, the guest
    server's connection is closed (its write fails), nothing is left open."""
    with httpx.stream(
        "GET", f"{ingress_server.url}/forever", headers={"Host": sbx.get_host(8001)}, timeout=30
    ) as reply:
        assert reply.status_code == 200
        got = 0
        for chunk in reply.iter_raw():
            got += len(chunk)
            if got > 4 << 20:
                break
    deadline = time.monotonic() + 30
    while (left := _guest_connections(sbx, 8001)) > 0:
        assert time.monotonic() < deadline, f"{left} guest connections to 8001 left open"
        time.sleep(0.5)
    again = httpx.post(
        f"{ingress_server.url}/echo", content=b"still here", headers={"Host": sbx.get_host(8001)}
    )
    assert again.content == b"still here"


def _ws_connect(server: Server, host: str) -> tuple[socket.socket, WSConnection]:
    sock = socket.create_connection(("127.0.0.1", _port_of(server)), timeout=30)
    ws = WSConnection(ConnectionType.CLIENT)
    sock.sendall(ws.send(Request(host=host, target="/chat")))
    return sock, ws


def _ws_events(sock: socket.socket, ws: WSConnection, want: type) -> object:
    while True:
        for event in ws.events():
            if isinstance(event, want):
                return event
        data = sock.recv(65536)
        ws.receive_data(data or None)
        if not data:
            for event in ws.events():
                if isinstance(event, want):
                    return event
            raise AssertionError(f"connection closed before {want.__name__}")


def test_websocket_echo(ingress_server: Server, sbx: Sandbox) -> None:
    sock, ws = _ws_connect(ingress_server, sbx.get_host(8002))
    with sock:
        _ws_events(sock, ws, AcceptConnection)
        for text in ("hello", "x" * 5000):
            sock.sendall(ws.send(TextMessage(data=text)))
            reply = _ws_events(sock, ws, TextMessage)
            assert isinstance(reply, TextMessage) and reply.data == f"echo: {text}"
        sock.sendall(ws.send(CloseConnection(code=1000)))
        closed = _ws_events(sock, ws, CloseConnection)
        assert isinstance(closed, CloseConnection) and closed.code == 1000


def test_closed_port_is_a_prompt_502(ingress_server: Server, sbx: Sandbox) -> None:
    started = time.monotonic()
    reply = httpx.get(f"{ingress_server.url}/", headers={"Host": sbx.get_host(9)})
    assert reply.status_code == 502 and "nothing listens on port 9" in reply.json()["message"]
    assert time.monotonic() - started < 5
    unknown = httpx.get(f"{ingress_server.url}/", headers={"Host": "8000-inosuchsandbox00.localhost:1"})
    assert unknown.status_code in (401, 404)  # not our domain: an ordinary control-plane request
    wrong = httpx.get(
        f"{ingress_server.url}/",
        headers={"Host": f"8000-inosuchsandbox00.localhost:{_port_of(ingress_server)}"},
    )
    assert wrong.status_code == 502 and "not found" in wrong.json()["message"]
    assert sbx.commands.run("echo alive").stdout == "alive\n"  # the sandbox is unharmed


def test_private_traffic_needs_the_token(ingress_server: Server) -> None:
    sandbox = Sandbox.create(timeout=300, network={"allow_public_traffic": False})
    try:
        assert sandbox.traffic_access_token
        sandbox.files.write("/tmp/www/hello.txt", "private\n")
        sandbox.commands.run("python3 -m http.server 8000 --directory /tmp/www", background=True)
        url, host = f"{ingress_server.url}/hello.txt", sandbox.get_host(8000)
        token = {"e2b-traffic-access-token": sandbox.traffic_access_token}
        deadline = time.monotonic() + 60
        while httpx.get(url, headers={"Host": host, **token}).status_code == 502:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert httpx.get(url, headers={"Host": host}).status_code == 403
        wrong = {"e2b-traffic-access-token": "x" + sandbox.traffic_access_token}
        assert httpx.get(url, headers={"Host": host, **wrong}).status_code == 403
        ok = httpx.get(url, headers={"Host": host, **token})
        assert (ok.status_code, ok.text) == (200, "private\n")
        # no network interface was made for it: ingress asks for none, and gives no egress
        ifaces = sandbox.commands.run("ls /sys/class/net").stdout.split()
        assert ifaces == ["lo"]
    finally:
        sandbox.kill()


def _guest_connections(sbx: Sandbox, port: int) -> int:
    script = (
        "import sys; n = 0\n"
        "for line in open('/proc/net/tcp').readlines()[1:]:\n"
        "    f = line.split()\n"
        f"    n += f[1].endswith(':{port:04X}') and f[3] == '01'\n"
        "print(n)"
    )
    sbx.files.write("/tmp/count.py", script)
    return int(sbx.commands.run("python3 /tmp/count.py").stdout)


def test_idle_ingress_connections_are_bounded_and_freed(ingress_server: Server, sbx: Sandbox) -> None:
    """1,000 clients hold a request open on a port that never answers; the server keeps serving,
    and once they go away every guest connection is closed."""
    request = f"GET / HTTP/1.1\r\nHost: {sbx.get_host(8003)}\r\n\r\n".encode()
    clients = []
    started = time.monotonic()
    try:
        for _ in range(IDLE_CONNECTIONS):
            sock = socket.create_connection(("127.0.0.1", _port_of(ingress_server)), timeout=30)
            sock.sendall(request)
            clients.append(sock)
        deadline = time.monotonic() + 120
        while _guest_connections(sbx, 8003) < IDLE_CONNECTIONS:
            assert time.monotonic() < deadline, "the idle connections did not all reach the guest"
            time.sleep(1)
        opened = time.monotonic() - started
        print(f"{IDLE_CONNECTIONS} idle ingress connections open in {opened:.1f}s")
        assert httpx.get(f"{ingress_server.url}/health").status_code == 200
        ok = httpx.get(f"{ingress_server.url}/hello.txt", headers={"Host": sbx.get_host(8000)})
        assert ok.status_code == 200
    finally:
        for sock in clients:
            sock.close()
    deadline = time.monotonic() + 60
    while (left := _guest_connections(sbx, 8003)) > 0:
        assert time.monotonic() < deadline, f"{left} guest connections left after the clients went"
        time.sleep(1)
    assert httpx.get(f"{ingress_server.url}/health", headers={"x-api-key": API_KEY}).status_code == 200
