"""The secrets proxy's pure parts: request heads, SNI, placeholders, the per-sandbox CA."""

from __future__ import annotations

import contextlib
import ssl

import pytest

from capsa import Gateway
from capsa.errors import ConfigError
from capsa.net.http1 import HttpError, chunk_size, parse_request
from capsa.net.intercept import parse_sni
from capsa.net.secrets import SecretSession


def test_a_request_head_is_parsed_and_swapped() -> None:
    head = (
        b"GET /v1?key=PH&x=1 HTTP/1.1\r\nHost: API.Example.com:443\r\nAuthorization: Bearer PH\r\n\r\n"
    )
    request = parse_request(head)
    assert request.host == "api.example.com" and request.length is None and not request.chunked
    assert request.swap({"PH": "a b&c"}) == ["PH"]
    assert request.head() == (
        b"GET /v1?key=a%20b%26c&x=1 HTTP/1.1\r\nHost: API.Example.com:443\r\n"
        b"Authorization: Bearer a b&c\r\n\r\n"
    )


@pytest.mark.parametrize(
    "head",
    [
        b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        b"GET / HTTP/2.0\r\n\r\n",
        b"GET  / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
    ],
)
def test_ambiguous_heads_are_refused(head: bytes) -> None:
    with pytest.raises(HttpError):
        parse_request(head)


def test_chunk_sizes() -> None:
    assert chunk_size(b"1a;ext=1\r\n") == 26
    for bad in (b"\r\n", b"-1\r\n", b"1 2\r\n", b"1" * 20 + b"\r\n", b"zz\r\n"):
        with pytest.raises(HttpError):
            chunk_size(bad)


def _hello(name: str) -> bytes:
    outgoing = ssl.MemoryBIO()
    client = ssl.create_default_context().wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()


def test_sni_is_read_from_a_client_hello() -> None:
    assert parse_sni(_hello("API.example.com")) == "api.example.com"
    hello = _hello("api.example.com")
    for cut in range(0, len(hello), 7):  # truncated anywhere: None or the name, never an exception
        assert parse_sni(hello[:cut]) in (None, "api.example.com")
    assert parse_sni(b"GET / HTTP/1.1\r\n") is None


def test_placeholders_keep_a_known_prefix_and_are_per_sandbox() -> None:
    gateway = Gateway().secret("A", "sk-ant-" + "x" * 60, hosts=["api.example.com"])
    gateway = gateway.secret("B", "hunter2_password", hosts=["b.example.com:8443"])
    one, two = SecretSession(gateway.secrets), SecretSession(gateway.secrets)
    a = one.placeholders["A"]
    assert a.startswith("sk-ant-") and len(a) == len("sk-ant-") + 60 and "x" * 10 not in a
    b = one.placeholders["B"]
    assert not b.startswith("hunter") and len(b) == 40 and b.isalnum()
    assert one.placeholders != two.placeholders
    assert one.intercepts(frozenset({"b.example.com"}), 8443)
    assert not one.intercepts(frozenset({"b.example.com"}), 443)


def test_the_ca_signs_only_for_its_hosts() -> None:
    session = SecretSession(Gateway().secret("A", "v" * 20, hosts=["*.example.com"]).secrets)
    context = session.ca.server_context("api.example.com")
    assert session.ca.server_context("api.example.com") is context  # cached
    assert "PRIVATE" not in session.ca.pem and "hidden" in repr(session.ca)
    client = ssl.create_default_context(cadata=session.ca.pem)
    server_in, server_out, client_in, client_out = (ssl.MemoryBIO() for _ in range(4))
    server = context.wrap_bio(server_in, server_out, server_side=True)
    tls = client.wrap_bio(client_in, client_out, server_hostname="api.example.com")
    for _ in range(10):
        for side, out, peer_in in ((tls, client_out, server_in), (server, server_out, client_in)):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
            peer_in.write(out.read())
    assert tls.version() is not None and tls.selected_alpn_protocol() is None


def test_a_header_secret_replaces_the_guests_header_and_has_no_placeholder() -> None:
    gateway = Gateway().secret("TOKEN", "Bearer real", hosts=["api.example.com"], header="Authorization")
    (secret,) = gateway.secrets
    assert "real" not in repr(secret) and "header='Authorization'" in repr(secret)
    session = SecretSession(gateway.secrets)
    assert session.environment() == {}  # nothing for the guest
    assert session.bound("api.example.com", 443)
    request = parse_request(b"GET / HTTP/1.1\r\nHost: api.example.com\r\nauthorization: mine\r\n\r\n")
    request.set_header("Authorization", "Bearer real")
    assert request.head().count(b"uthorization") == 1 and b"Authorization: Bearer real" in request.head()


@pytest.mark.parametrize("header", ["Host", "content-length", "Transfer-Encoding", "X Y", "X\r\nY", ""])
def test_a_header_secret_never_frames_the_request(header: str) -> None:
    with pytest.raises(ConfigError):
        Gateway().secret("TOKEN", "v", hosts=["api.example.com"], header=header)


def test_header_secrets_are_replaced_live_only_for_hosts_the_ca_covers() -> None:
    gateway = (
        Gateway()
        .secret("KEY", "sk-placeholder-kept-0123456789", hosts=["api.example.com"])
        .secret("OLD", "Bearer old", hosts=["*.example.org"], header="X-Old")
    )
    session = SecretSession(gateway.secrets)
    placeholders = dict(session.placeholders)
    new = Gateway().secret("NEW", "Bearer new", hosts=["deep.x.example.org"], header="X-New").secrets
    session.set_headers(new)
    assert [s.name for s in session.secrets] == ["KEY", "NEW"] and session.placeholders == placeholders
    elsewhere = Gateway().secret("FAR", "v", hosts=["example.net"], header="X-Far").secrets
    with pytest.raises(ConfigError, match="CA was not made for"):
        session.set_headers(elsewhere)
    with pytest.raises(ConfigError, match="no header secret"):
        session.set_headers(gateway.secrets[:1])
    assert [s.name for s in session.secrets] == ["KEY", "NEW"]


def test_the_proxy_makes_room_for_its_file_descriptors() -> None:
    """A process whose soft ``ulimit -n`` is below what 1024 intercepted connections need (three
    descriptors each) gets it raised towards the hard limit when an interceptor is made."""
    import subprocess
    import sys

    script = (
        "import resource\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))\n"
        "from capsa.net.intercept import make_fd_room\n"
        "print(make_fd_room(1024), resource.getrlimit(resource.RLIMIT_NOFILE)[0], hard)\n"
    )
    argv = [sys.executable, "-c", script]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    returned, soft, hard = (int(x) for x in done.stdout.split())
    assert returned == soft == (hard if hard >= 0 else 1 << 16)  # the hard limit (or 64 Ki if none)
