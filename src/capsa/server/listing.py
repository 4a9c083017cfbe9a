"""E2B's list queries: the filters of ``GET /v2/sandboxes`` and the paging of it and of
``GET /snapshots``. A page holds at most ``limit`` items (1 to 100, default 100, as in E2B); when
more follow, the reply carries an ``x-next-token`` header, which the SDKs send back as
``nextToken`` to get the next page. The token is the position of the page's last item (its sort
key), so a page never repeats or skips an item that stays listed while a client pages."""

from __future__ import annotations

import base64
import binascii
import datetime
import urllib.parse
from collections.abc import Callable, Sequence
from typing import TypeVar

from starlette.datastructures import QueryParams

from capsa.server.entry import ApiError, Entry

MAX_PAGE = 100
STATES = ("running", "paused")
NEXT_TOKEN = "x-next-token"

T = TypeVar("T")


def page_limit(value: str | None) -> int:
    if value is None:
        return MAX_PAGE
    if not value.isdigit() or not 1 <= int(value) <= MAX_PAGE:
        raise ApiError(400, f"limit must be from 1 to {MAX_PAGE}, got {value!r:.20}")
    return int(value)


def _token(position: str) -> str:
    return base64.urlsafe_b64encode(position.encode()).decode().rstrip("=")


def _position(token: str) -> str:
    try:
        padded = token + "=" * (-len(token) % 4)
        position = base64.b64decode(padded, altchars=b"-_", validate=True).decode()
    except (ValueError, binascii.Error, UnicodeDecodeError):
        position = ""
    if not position:
        raise ApiError(400, "nextToken is not a token this server gave")
    return position


def page(
    items: Sequence[T], key: Callable[[T], str], query: QueryParams, *, descending: bool = False
) -> tuple[list[T], str | None]:
    """One page of ``items`` sorted by ``key`` (a string that orders them and is unique), and the
    token of the next page (None on the last)."""
    limit = page_limit(query.get("limit"))
    ordered = sorted(items, key=key, reverse=descending)
    token = query.get("nextToken")
    if token:
        after = _position(token)
        ordered = [i for i in ordered if (key(i) < after if descending else key(i) > after)]
    chosen = ordered[:limit]
    more = len(ordered) > limit
    return chosen, _token(key(chosen[-1])) if more and chosen else None


def sandbox_key(entry: Entry) -> str:
    """Start time, then id: the order E2B lists sandboxes in."""
    return f"{entry.started_at.isoformat()}|{entry.id}"


def filter_sandboxes(entries: list[Entry], query: QueryParams) -> list[Entry]:
    """The ``state``, ``metadata``, ``template`` and ``startedAfter`` filters of a list call."""
    states = query.get("state")
    if states:
        wanted_states = states.split(",")
        unknown = [s for s in wanted_states if s not in STATES]
        if unknown:
            raise ApiError(400, f"unknown state {unknown[0]!r:.40}; states: {', '.join(STATES)}")
        entries = [e for e in entries if e.state in wanted_states]
    # the SDKs quote each key and value, then url-encode the pairs: decode both layers
    pairs = urllib.parse.parse_qsl(query.get("metadata") or "")
    wanted = {urllib.parse.unquote(k): urllib.parse.unquote(v) for k, v in pairs}
    entries = [e for e in entries if all(e.metadata.get(k) == v for k, v in wanted.items())]
    template = query.get("template")
    if template:
        entries = [e for e in entries if e.template == template]
    after = query.get("startedAfter")
    if after:
        try:
            since = datetime.datetime.fromisoformat(after)
        except ValueError:
            raise ApiError(400, f"startedAfter is not an ISO 8601 time: {after!r:.40}") from None
        if since.tzinfo is None:
            since = since.replace(tzinfo=datetime.UTC)
        entries = [e for e in entries if e.started_at > since]
    return entries


def descending(query: QueryParams) -> bool:
    order = query.get("order") or "desc"
    if order not in ("asc", "desc"):
        raise ApiError(400, f"order must be 'asc' or 'desc', got {order!r:.20}")
    return order == "desc"
