"""Signed ``/files`` URLs: ``sandbox.download_url(path)`` and ``upload_url(path)``.

The SDK signs a URL with the sandbox's access token: ``v1_`` + base64 (unpadded) of
``sha256("PATH:OPERATION:USER:TOKEN[:EXPIRATION]")``, OPERATION being ``read`` or ``write``, and
puts the signature (and the expiration, unix seconds) in the query. Such a URL is meant to be
opened by anything (a browser, ``curl``), so it carries no routing header either: when
``E2B_SANDBOX_URL`` points at this server the sandbox is the one whose token made the signature.
Finding it costs one hash per running sandbox (a few hundred at most); the comparison is
constant-time, and a signature that matches no sandbox is refused like a bad token (401).
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from collections.abc import Iterable
from urllib.parse import parse_qs

from capsa.server.entry import ApiError, Entry

SIGNATURE_PARAM = b"signature="


def has_signature(query_string: bytes) -> bool:
    """Whether a request's query carries a signature (a signed ``/files`` URL)."""
    return query_string.startswith(SIGNATURE_PARAM) or b"&" + SIGNATURE_PARAM in query_string


def signature(path: str, operation: str, user: str, token: str, expiration: int | None) -> str:
    raw = f"{path}:{operation}:{user}:{token}"
    if expiration is not None:
        raw += f":{expiration}"
    digest = hashlib.sha256(raw.encode()).digest()
    return "v1_" + base64.b64encode(digest).rstrip(b"=").decode("ascii")


def _one(query: dict[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    if values is None:
        return None
    if len(values) != 1:
        raise ApiError(400, f"the query names {name!r} more than once")
    return values[0]


def signed_sandbox(
    entries: Iterable[Entry], method: str, query_string: bytes, now: float | None = None
) -> Entry:
    """The sandbox whose access token signed this ``/files`` request (GET reads, POST writes);
    401 if none did, or if the signature's expiration has passed."""
    query = parse_qs(query_string.decode("latin-1"), keep_blank_values=True)
    given = _one(query, "signature") or ""
    path = _one(query, "path") or ""
    user = _one(query, "username") or ""
    raw_expiration = _one(query, "signature_expiration")
    expiration = None
    if raw_expiration is not None:
        try:
            expiration = int(raw_expiration)
        except ValueError:
            raise ApiError(400, "signature_expiration must be unix seconds") from None
    operation = "write" if method == "POST" else "read"
    found = None
    for entry in entries:
        expected = signature(path, operation, user, entry.token, expiration)
        if secrets.compare_digest(expected.encode(), given.encode("latin-1")):
            found = entry
    if found is None:
        raise ApiError(401, "invalid signature")
    if expiration is not None and expiration < (time.time() if now is None else now):
        raise ApiError(401, "signature is already expired")
    return found
