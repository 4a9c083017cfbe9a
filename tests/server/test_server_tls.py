"""``capsa serve --tls auto``: the real E2B SDK over HTTPS, trusting the generated CA through
``SSL_CERT_FILE`` as a user would, and ``get_host`` over HTTPS to servers in real guests.

The SDK runs in a subprocess: its HTTP transport (pyqwest) is cached per process and reads the
trusted CAs when it is made, so an SDK already used by another module in this process would
ignore ``SSL_CERT_FILE``. Names under ``capsa.localhost`` need no resolver: the requests go to
127.0.0.1 with the ``Host`` header and the TLS server name set to them, as a browser sends them."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("e2b")
pytest.importorskip("cryptography")

from tests.server.conftest import API_KEY, REPO, Server, start_server
from tests.server.test_server_ingress import GUEST_SERVERS  # 8001 HTTP echo, 8002 WebSocket echo

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300)]

# Each guest server answers with the Host header it was sent.
GUEST_SERVER = """
import http.server
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("host=" + self.headers.get("Host", "")).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", 8000), H).serve_forever()
"""

SDK_SCRIPT = r"""
import json, socket, ssl, sys, time
import httpx
from e2b import Sandbox
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request, TextMessage

base, key, guest_server, ws_servers = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
seen = {}
client = httpx.Client(timeout=30)  # trusts SSL_CERT_FILE, as the SDK does

def via_host(host, path="/", headers=None):
    # to the server's address, with the Host and TLS server name of the get_host name
    return client.get(f"{base}{path}", headers={"Host": host, **(headers or {})},
                      extensions={"sni_hostname": host.rsplit(":", 1)[0]})

def serve(sandbox, headers=None):
    sandbox.files.write("/tmp/server.py", guest_server)
    sandbox.commands.run("python3 /tmp/server.py", background=True)
    deadline = time.monotonic() + 60
    while (reply := via_host(sandbox.get_host(8000), headers=headers)).status_code == 502:
        assert time.monotonic() < deadline, reply.text
        time.sleep(0.2)
    return reply

public = Sandbox.create(timeout=300)
private = Sandbox.create(timeout=300, network={
    "allow_public_traffic": False, "mask_request_host": "custom-host.example.com:${PORT}"})
try:
    seen["domain"] = public.sandbox_domain
    seen["id"] = public.sandbox_id
    seen["host"] = public.get_host(8000)
    seen["echo"] = public.commands.run("echo over tls").stdout
    public.files.write("/tmp/www/hello.txt", "hello over tls\n")
    seen["read"] = public.files.read("/tmp/www/hello.txt")
    reply = serve(public)
    seen["public"] = [reply.status_code, reply.text]
    # envd by its host, as the SDK addresses it without E2B_SANDBOX_URL
    token = client.get(f"{base}/sandboxes/{public.sandbox_id}", headers={"X-API-KEY": key}
                       ).json()["envdAccessToken"]
    envd = via_host(f"49983-{public.sandbox_id}.{public.sandbox_domain}", "/files?path=/tmp/www/hello.txt",
                    {"X-Access-Token": token})
    seen["envd_by_host"] = [envd.status_code, envd.text]
    # a WebSocket through get_host over TLS (the guest's echo server on 8002)
    public.files.write("/tmp/ws.py", ws_servers)
    public.commands.run("python3 /tmp/ws.py", background=True, user="root")  # raises its fd limit
    host = public.get_host(8002)
    deadline = time.monotonic() + 60
    while via_host(public.get_host(8001), "/").status_code == 502:  # its servers are up
        assert time.monotonic() < deadline
        time.sleep(0.2)
    raw = socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1])), timeout=30)
    with ssl.create_default_context().wrap_socket(raw, server_hostname=host.rsplit(":", 1)[0]) as sock:
        ws = WSConnection(ConnectionType.CLIENT)
        sock.sendall(ws.send(Request(host=host, target="/chat")))
        events = []
        while not any(isinstance(e, TextMessage) for e in events):
            data = sock.recv(65536)
            assert data, events
            ws.receive_data(data)
            for event in ws.events():
                events.append(event)
                if isinstance(event, AcceptConnection):
                    sock.sendall(ws.send(TextMessage(data="over wss")))
        seen["websocket"] = [e.data for e in events if isinstance(e, TextMessage)]
    traffic = {"e2b-traffic-access-token": private.traffic_access_token}
    reply = serve(private, traffic)
    seen["private_token"] = [reply.status_code, reply.text]
    seen["private_no_token"] = via_host(private.get_host(8000)).status_code
finally:
    public.kill()
    private.kill()
print(json.dumps(seen))
"""


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    directory = tmp_path_factory.mktemp("serve-tls")
    ca_dir = directory / "tls"
    srv = start_server(
        directory,
        *("--tls", "auto", "--tls-dir", str(ca_dir), "--pool", "base=2", "--max-sandboxes", "3"),
        ca=ca_dir / "ca.pem",
    )
    try:
        yield srv, ca_dir
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def seen(tls_server: tuple[Server, Path]) -> dict[str, Any]:
    server, ca_dir = tls_server
    env = {k: v for k, v in os.environ.items() if not k.startswith("E2B_")}
    env.update(
        E2B_API_URL=server.url,
        E2B_SANDBOX_URL=server.url,
        E2B_API_KEY=API_KEY,
        SSL_CERT_FILE=str(ca_dir / "bundle.pem"),  # the system's CAs and capsa's local one
    )
    run = subprocess.run(
        [sys.executable, "-c", SDK_SCRIPT, server.url, API_KEY, GUEST_SERVER, GUEST_SERVERS],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=240,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return dict(json.loads(run.stdout.strip().splitlines()[-1]))


def test_the_sdk_works_over_https_with_the_generated_ca(
    tls_server: tuple[Server, Path], seen: dict[str, Any]
) -> None:
    server, _ = tls_server
    port = server.url.rsplit(":", 1)[1]
    assert server.url.startswith("https://")
    assert seen["domain"] == f"capsa.localhost:{port}"  # --tls auto's default domain
    assert seen["host"] == f"8000-{seen['id']}.capsa.localhost:{port}"
    assert seen["echo"] == "over tls\n"
    assert seen["read"] == "hello over tls\n"


def test_the_server_is_not_trusted_without_the_ca(tls_server: tuple[Server, Path]) -> None:
    server, ca_dir = tls_server
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{server.url}/health", verify=ssl.create_default_context())
    trusted = ssl.create_default_context(cafile=ca_dir / "ca.pem")
    assert httpx.get(f"{server.url}/health", verify=trusted).status_code == 200


def test_get_host_over_https_reaches_the_guest_server(seen: dict[str, Any]) -> None:
    assert seen["public"] == [200, f"host={seen['host']}"]  # the client's Host, unmasked


def test_envd_answers_on_its_own_host(seen: dict[str, Any]) -> None:
    assert seen["envd_by_host"] == [200, "hello over tls\n"]


def test_private_ports_need_the_traffic_token_over_https(seen: dict[str, Any]) -> None:
    assert seen["private_no_token"] == 403
    assert seen["private_token"][0] == 200


def test_mask_request_host_is_the_host_the_guest_server_sees(seen: dict[str, Any]) -> None:
    assert seen["private_token"][1] == "host=custom-host.example.com:8000"


def test_websocket_through_get_host_over_tls(seen: dict[str, Any]) -> None:
    assert seen["websocket"] == ["echo: over wss"]
