"""HTTP/1.1 request heads as the secrets proxy reads them from the guest: parsed strictly (so the proxy
and the upstream server agree on where each request ends), rewritten with placeholders swapped.

Pure logic, no sockets. Anything ambiguous is refused rather than guessed: a header folded over
lines, a bare CR or LF, ``Content-Length`` and ``Transfer-Encoding`` together, differing lengths, a
transfer coding other than chunked last, more than one ``Host``.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass

MAX_HEAD = 64 << 10  # bytes of a request head (the request line and headers)
MAX_HEADERS = 128
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION = re.compile(rb"HTTP/1\.[01]")


class HttpError(Exception):
    """A request the proxy refuses: ``status`` goes back to the guest and the connection closes."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason

    def response(self) -> bytes:
        text = self.reason.encode()
        return (
            b"HTTP/1.1 %d %s\r\nConnection: close\r\nContent-Type: text/plain\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (self.status, b"Refused", len(text), text)
        )


@dataclass
class Request:
    method: bytes
    target: bytes
    version: bytes
    headers: list[tuple[bytes, bytes]]
    length: int | None  # Content-Length (None: none given)
    chunked: bool
    upgrade: bool  # an Upgrade request (WebSocket): after it the stream is relayed as it is
    host: str | None  # the Host header's name, lowercase, without a port

    def head(self) -> bytes:
        lines = [b"%s %s %s" % (self.method, self.target, self.version)]
        lines += [name + b": " + value for name, value in self.headers]
        return b"\r\n".join(lines) + b"\r\n\r\n"

    def swap(self, replacements: dict[str, str]) -> list[str]:
        """Replace each placeholder (key) by its value in every header value and in the target's
        query (percent-encoded there); returns the placeholders that were found."""
        found = []
        for placeholder, value in replacements.items():
            needle = placeholder.encode()
            hit = False
            for i, (name, text) in enumerate(self.headers):
                if needle in text:
                    self.headers[i] = (name, text.replace(needle, value.encode()))
                    hit = True
            path, sep, query = self.target.partition(b"?")
            if sep and needle in query:
                encoded = urllib.parse.quote(value, safe="").encode()
                self.target = path + b"?" + query.replace(needle, encoded)
                hit = True
            if hit:
                found.append(placeholder)
        return found

    def set_header(self, name: str, value: str) -> None:
        """``name: value`` in place of every header of that name (case-insensitive), else added."""
        key = name.lower().encode()
        self.headers = [(n, v) for n, v in self.headers if n.lower() != key]
        self.headers.append((name.encode(), value.encode()))

    def carries(self, placeholder: str) -> bool:
        needle = placeholder.encode()
        return needle in self.target or any(needle in value for _, value in self.headers)


def parse_request(head: bytes) -> Request:
    """``head``: the bytes up to and including the blank line (``\\r\\n\\r\\n``)."""
    if len(head) > MAX_HEAD:
        raise HttpError(431, "request head too large")
    if not head.endswith(b"\r\n\r\n"):
        raise HttpError(400, "truncated request head")
    lines = head[:-4].split(b"\r\n")
    if any(b"\r" in line or b"\n" in line or b"\0" in line for line in lines):
        raise HttpError(400, "bare CR, LF or NUL in the request head")
    parts = lines[0].split(b" ")
    if (
        len(parts) != 3
        or not _TOKEN.fullmatch(parts[0])
        or not parts[1]
        or not _VERSION.fullmatch(parts[2])
    ):
        raise HttpError(400, "malformed request line")
    if len(lines) - 1 > MAX_HEADERS:
        raise HttpError(431, "too many headers")
    headers: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            raise HttpError(400, "malformed header line (folded or without a name)")
        headers.append((name, value.strip(b" \t")))
    lengths = {v for n, v in headers if n.lower() == b"content-length"}
    codings = [
        c.strip().lower() for n, v in headers if n.lower() == b"transfer-encoding" for c in v.split(b",")
    ]
    hosts = [v for n, v in headers if n.lower() == b"host"]
    if len(hosts) > 1:
        raise HttpError(400, "more than one Host header")
    if codings and lengths:
        raise HttpError(400, "both Content-Length and Transfer-Encoding")
    if codings and codings[-1] != b"chunked":
        raise HttpError(400, "a request's last transfer coding must be chunked")
    length = None
    if lengths:
        if len(lengths) > 1 or not all(v.isdigit() and len(v) <= 18 for v in lengths):
            raise HttpError(400, "invalid Content-Length")
        length = int(next(iter(lengths)))
    upgrade = any(n.lower() == b"upgrade" for n, _ in headers) or parts[0] == b"CONNECT"
    return Request(parts[0], parts[1], parts[2], headers, length, bool(codings), upgrade,
                   _host_name(hosts[0]) if hosts else None)  # fmt: skip


def _host_name(value: bytes) -> str | None:
    text = value.decode("ascii", "replace").strip().lower()
    if text.startswith("["):
        return None  # an IPv6 literal: never a bound host
    name, _, port = text.partition(":")
    if port and not port.isdigit():
        return None
    return name.removesuffix(".") or None


def chunk_size(line: bytes) -> int:
    """The size in a chunk-size line (``1a;ext=1\\r\\n``)."""
    text = line[:-2].split(b";", 1)[0].strip(b" \t") if line.endswith(b"\r\n") else b""
    if not text or len(text) > 15 or not all(c in b"0123456789abcdefABCDEF" for c in text):
        raise HttpError(400, "malformed chunk size")
    return int(text, 16)
