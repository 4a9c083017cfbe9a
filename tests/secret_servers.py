"""Local upstreams for the secrets tests and bench: a DNS server mapping test names to 127.0.0.x, and
HTTPS servers on port 443 there with a test CA of their own (handed to ``Gateway.upstream_ca``), one
of them with a certificate no one trusts. The servers record the headers and URLs they receive."""

from __future__ import annotations

import datetime
import http.server
import random
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from dnslib import QTYPE, RR, A
from dnslib.server import BaseResolver, DNSLogger, DNSServer

from capsa import Gateway, NetworkPolicy

API = "api.secret.test"  # bound to the secret KEY
OTHER = "other.secret.test"  # bound to the secret OTHER_KEY (same server)
FREE = "free.secret.test"  # allowed, bound to nothing (the same server on an address of its own)
BAD = "bad.secret.test"  # bound to KEY, but its certificate is from an untrusted CA
VALUE = "sk-live-" + "Z" * 8 + "real-secret-value-0123456789abcdef"
OTHER_VALUE = "other-real-secret-value-9876543210"
BIG = 64 << 20

# A guest's client opening ``count`` HTTPS connections to ``host`` at once (asyncio), each sending
# one request with the placeholder of KEY; all are held open until every one has its response, so
# they are all intercepted at the same time (those that failed count as done). Prints {"ok", "failed",
# "errors", "seconds"}.
MANY_CLIENT = r"""
import asyncio, asyncio.sslproto, json, os, resource, socket, ssl, sys, time
# asyncio gives each TLS connection a 256 KiB read buffer: a thousand would fill the guest's memory
asyncio.sslproto.SSLProtocol.max_size = 16384
host, count = sys.argv[1], int(sys.argv[2])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, count + 256)), hard))
address = socket.gethostbyname(host)
context = ssl.create_default_context()
head = ("GET /many HTTP/1.1\r\nHost: %s\r\nAuthorization: Bearer %s\r\n\r\n"
        % (host, os.environ["KEY"])).encode()
finished = 0
everyone = None
def finish():
    global finished
    finished += 1
    if finished == count:
        everyone.set()
async def one():
    writer = None
    try:
        reader, writer = await asyncio.open_connection(address, 443, ssl=context,
                                                       server_hostname=host, ssl_handshake_timeout=120)
        writer.write(head)
        await writer.drain()
        status = await reader.readline()
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        result = status.split()[1] == b"200" and await reader.readexactly(length) == b"ok"
    except Exception as exc:
        result = exc
    finish()
    if writer is not None:
        await asyncio.wait_for(everyone.wait(), 300)  # held open until all have answers
        writer.close()
    if isinstance(result, Exception):
        raise result
    return result
async def main():
    global everyone
    everyone = asyncio.Event()
    started = time.monotonic()
    results = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
    errors = sorted({repr(r)[:200] for r in results if isinstance(r, BaseException)})
    print(json.dumps({"ok": sum(r is True for r in results), "failed": count - sum(r is True for r in results),
                      "errors": errors[:5], "seconds": time.monotonic() - started}))
asyncio.run(main())
"""
_CHUNK = bytes(range(256)) * 256


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name | None,
          issuer_key: ec.EllipticCurvePrivateKey, names: list[str], *, ca: bool) -> x509.Certificate:  # fmt: skip
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )  # fmt: skip
    if names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@dataclass
class Seen:
    path: str
    headers: dict[str, str]


@dataclass
class Upstreams:
    dns_port: int
    addresses: dict[str, str]
    ca_file: Path
    seen: list[Seen] = field(default_factory=list)

    def gateway(self, *, policy: NetworkPolicy | None = None) -> Gateway:
        policy = policy or (NetworkPolicy.deny_all().allow_domain("*.secret.test"))
        return (
            Gateway("10.0.2.0/24").policy(policy).dns_servers([f"127.0.0.1:{self.dns_port}"])
            .allow_internal_destinations().upstream_ca(self.ca_file)
            .secret("KEY", VALUE, hosts=[API, BAD])
            .secret("OTHER_KEY", OTHER_VALUE, hosts=[OTHER])
        )  # fmt: skip


class _Resolver(BaseResolver):
    def __init__(self, addresses: dict[str, str]) -> None:
        self.addresses = addresses

    def resolve(self, request, handler):  # type: ignore[no-untyped-def]
        name = str(request.q.qname).rstrip(".").lower()
        reply = request.reply()
        if name in self.addresses and request.q.qtype == QTYPE.A:
            reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(self.addresses[name]), ttl=60))
        return reply


def _handler(seen: list[Seen]) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            seen.append(Seen(self.path, {k: v for k, v in self.headers.items()}))
            if self.path.startswith("/sse"):
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for i in range(3):
                    event = b"data: %d %.3f\n\n" % (i, time.time())
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
                    self.wfile.flush()
                    time.sleep(1.0)
                self.wfile.write(b"0\r\n\r\n")
                return
            if self.path.startswith("/big"):
                self.send_response(200)
                self.send_header("Content-Length", str(BIG))
                self.end_headers()
                for _ in range(BIG // len(_CHUNK)):
                    self.wfile.write(_CHUNK)
                return
            body = b"ok"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_POST = do_GET

    return Handler


class _Server(http.server.ThreadingHTTPServer):
    request_queue_size = 2048  # a guest opening a thousand connections at once


def _serve(address: str, context: ssl.SSLContext, seen: list[Seen]) -> http.server.ThreadingHTTPServer:
    server = _Server((address, 443), _handler(seen))
    server.daemon_threads = True
    server.socket = context.wrap_socket(  # the handshake in the handler thread, not accept()
        server.socket, server_side=True, do_handshake_on_connect=False
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _bind_three() -> list[str]:
    """Three 127.0.0.x addresses with port 443 free (random, so parallel runs do not collide)."""
    found: list[str] = []
    for x in random.sample(range(10, 250), 240):
        address = f"127.0.0.{x}"
        with socket.socket() as probe:
            try:
                probe.bind((address, 443))
            except OSError:
                continue
        found.append(address)
        if len(found) == 3:
            return found
    raise RuntimeError("no free 127.0.0.x:443")


@contextmanager
def upstreams() -> Iterator[Upstreams]:
    good, bad, free = _bind_three()
    ca_key, leaf_key, rogue_key = _key(), _key(), _key()
    ca = _cert("capsa test upstream CA", ca_key, None, ca_key, [], ca=True)
    leaf = _cert(API, leaf_key, ca.subject, ca_key, [API, OTHER, FREE], ca=False)
    rogue = _cert(BAD, rogue_key, None, rogue_key, [BAD], ca=False)  # self-signed: trusted by no one
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "ca.pem").write_bytes(_pem(ca))
        (root / "good.pem").write_bytes(_pem(leaf) + _key_pem(leaf_key))
        (root / "bad.pem").write_bytes(_pem(rogue) + _key_pem(rogue_key))
        contexts = []
        for name in ("good", "bad"):
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(root / f"{name}.pem")
            contexts.append(context)
        addresses = {API: good, OTHER: good, FREE: free, BAD: bad}
        quiet = DNSLogger("-request,-reply,-truncated,-error,-recv,-send,-data", prefix=False)
        dns = DNSServer(_Resolver(addresses), address="127.0.0.1", port=0, logger=quiet)
        dns.start_thread()
        result = Upstreams(dns.server.server_address[1], addresses, root / "ca.pem")
        servers = [_serve(good, contexts[0], result.seen), _serve(bad, contexts[1], result.seen),
                   _serve(free, contexts[0], result.seen)]  # fmt: skip
        try:
            yield result
        finally:
            for server in servers:
                server.shutdown()
                server.server_close()
            dns.stop()


RULE_VALUE = "Bearer rule-" + "Q" * 8 + "-header-value-0123456789abcdef"
GUEST_GET = r"""
import json, os, sys, urllib.request
out = {"KEY": os.environ.get("KEY")}
for url in sys.argv[1:]:
    host, _, url = url.rpartition("@")  # HOST@URL: that Host header instead of the URL's
    headers = {"Authorization": "Bearer " + os.environ.get("KEY", "none"), "X-Rule": "guest-own"}
    if host:
        headers["Host"] = host
    req = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            out[url] = ["ok", r.read().decode()]
    except Exception as exc:
        out[url] = ["failed", repr(exc)[:300]]
print(json.dumps(out))
"""


def secrets_file(path: Path, up: Upstreams) -> Path:
    """A ``--secrets-file`` offering KEY (bound to API, its value from the server's environment,
    ``SECRET_VALUE``) to the tenant ``default`` only, and OTHER_KEY (bound to OTHER, sent as the
    ``X-Other-Key`` header) to every tenant."""
    path.write_text(
        f'[KEY]\nenv = "SECRET_VALUE"\nhosts = ["{API}"]\ntenants = ["default"]\n\n'
        f'[OTHER_KEY]\nvalue = "{OTHER_VALUE}"\nhosts = ["{OTHER}"]\nheader = "X-Other-Key"\n'
    )
    return path
