"""How a sandbox's ports may be reached from outside (``allow_public_traffic`` and
``network.mask_request_host``): kept on the entry, read by ingress, set by create, fork, snapshot
restore and the state dir's reload. Its own module so that those need not import the ingress
router (which needs the registry)."""

from __future__ import annotations

from capsa.server.entry import Entry

PUBLIC_KEY = "public_traffic"  # Entry.extra: False when create asked for allow_public_traffic=False
MASK_KEY = "mask_request_host"  # Entry.extra: the Host the guest servers see (network.mask_request_host)


def set_public(entry: Entry, public: bool) -> None:
    entry.extra[PUBLIC_KEY] = public


def is_public(entry: Entry) -> bool:
    """Whether the sandbox's ports answer without its traffic token (forks and snapshots of a
    private sandbox are private too)."""
    return entry.extra.get(PUBLIC_KEY) is not False


def set_mask_host(entry: Entry, mask: str | None) -> None:
    if mask is None:
        entry.extra.pop(MASK_KEY, None)
    else:
        entry.extra[MASK_KEY] = mask


def mask_host(entry: Entry) -> str | None:
    """The sandbox's ``network.mask_request_host`` (``${PORT}`` not substituted), if it has one."""
    mask = entry.extra.get(MASK_KEY)
    return mask if isinstance(mask, str) else None


__all__ = ["is_public", "mask_host", "set_mask_host", "set_public"]
