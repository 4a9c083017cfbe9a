"""The shell every dashboard page shares: a header with the navigation, the CSRF token for the
page's script, its styles and scripts (all from ``/ui/static``). Every value is escaped."""

from __future__ import annotations

from html import escape

from capsa.server.ui.session import UiSession

STATIC = "/ui/static"


def page(
    title: str,
    body: str,
    *,
    session: UiSession | None = None,
    scripts: tuple[str, ...] = (),
    styles: tuple[str, ...] = (),
    data: dict[str, str] | None = None,
) -> str:
    """A whole HTML page; ``body`` is trusted markup (built with :func:`escape` by the caller),
    ``data`` becomes ``data-*`` attributes of ``<main>`` for the page's script."""
    links = "".join(f'<link rel="stylesheet" href="{STATIC}/{escape(s)}">' for s in ("ui.css", *styles))
    tags = "".join(f'<script src="{STATIC}/{escape(s)}" defer></script>' for s in ("ui.js", *scripts))
    meta = "" if session is None else f'<meta name="csrf-token" content="{escape(session.csrf)}">'
    attrs = "".join(f' data-{escape(k)}="{escape(v)}"' for k, v in (data or {}).items())
    return (
        "<!doctype html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><title>{escape(title)} · capsa</title>'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<link rel="icon" href="data:,">{meta}{links}{tags}'
        f"</head><body>{_header(session)}<main{attrs}>{body}</main></body></html>"
    )


def _header(session: UiSession | None) -> str:
    if session is None:
        return '<header><span class="brand">capsa</span></header>'
    who = escape(session.principal.tenant) + (" (admin)" if session.principal.admin else "")
    return (
        '<header><a class="brand" href="/ui/">capsa</a>'
        '<nav><a href="/ui/">Sandboxes</a><a href="/ui/server">Server</a></nav>'
        f'<span class="who">{who}</span>'
        '<button type="button" id="logout">Log out</button></header>'
    )
