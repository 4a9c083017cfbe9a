"""What a share is: a host directory, where the guest sees it, how, and whether it may write."""

from __future__ import annotations

import enum
import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from capsa.agent.errors import check_guest_path
from capsa.errors import ConfigError

Mechanism = Literal["auto", "virtiofs", "9p"]
MECHANISMS = ("auto", "virtiofs", "9p")
MAX_SHARES = 32


class AccessMode(enum.Enum):
    READ_ONLY = "ro"
    READ_WRITE = "rw"


@dataclass(frozen=True)
class ShareSpec:
    """One shared directory as configured (``mechanism`` may still be ``auto``)."""

    host_path: Path
    guest_path: str
    mode: AccessMode = AccessMode.READ_ONLY
    mechanism: Mechanism = "auto"
    # 9p only: "loose" lets the guest cache attributes, names and pages (for read-only shares that
    # ``auto`` put on 9p so the sandbox restores from a template; see docs/shares.md)
    guest_cache: Literal["none", "loose"] = "none"

    @property
    def read_only(self) -> bool:
        return self.mode is AccessMode.READ_ONLY


@dataclass(frozen=True)
class Share:
    """A share of a started VM: mount it in a raw guest with
    ``mount -t virtiofs <tag> <guest_path>`` (or ``-t 9p -o trans=virtio,version=9p2000.L``)."""

    tag: str
    host_path: Path
    guest_path: str
    mode: AccessMode
    mechanism: Literal["virtiofs", "9p"]

    def __iter__(self) -> Iterator[Any]:
        """Unpacks as ``(tag, host_path, guest_path, mode)``."""
        return iter((self.tag, self.host_path, self.guest_path, self.mode))


def check_host_dir(path: str | Path) -> Path:
    host = Path(path).expanduser()
    if not host.exists():
        raise ConfigError(f"share: host path not found: {host}")
    if not host.is_dir():
        raise ConfigError(f"share: host path is not a directory: {host}")
    if not os.access(host, os.R_OK | os.X_OK):
        raise ConfigError(f"share: host directory is not readable: {host}")
    return host.resolve()


def check_mount_point(path: str) -> str:
    """Where a share (or a volume) is mounted in the guest: a guest path as the file API takes it
    (:func:`capsa.agent.errors.check_guest_path`, the one rule for guest paths) that is also a
    clean mount point: no control characters, no ``.`` or ``..``, not the root. Returns it
    normalised. Messages start with ``share:`` (volume callers rewrite that word)."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise ConfigError(f"share: the guest path must be absolute, got {path!r}")
    if "\0" in path or any(ord(c) < 32 for c in path):
        raise ConfigError(f"share: the guest path has control characters: {path!r}")
    parts = PurePosixPath(path).parts
    if ".." in parts or "." in path.split("/"):
        raise ConfigError(f"share: the guest path must not contain '.' or '..': {path!r}")
    if path == "/":
        raise ConfigError("share: cannot mount a share over the guest's root")
    try:
        check_guest_path(path)  # what remains of the base rule: its length
    except ConfigError as exc:
        raise ConfigError(f"share: {exc.message}") from None
    return str(PurePosixPath(path))


def make_share(
    host_path: str | Path, guest_path: str, mode: AccessMode, mechanism: Mechanism
) -> ShareSpec:
    if not isinstance(mode, AccessMode):
        raise ConfigError(f"share: mode must be AccessMode.READ_ONLY or READ_WRITE, got {mode!r}")
    if mechanism not in MECHANISMS:
        raise ConfigError(f"share: mechanism must be one of {MECHANISMS}, got {mechanism!r}")
    host = check_host_dir(host_path)
    if mode is AccessMode.READ_WRITE and not os.access(host, os.W_OK):
        raise ConfigError(f"share: host directory is not writable: {host}", hint="share it READ_ONLY")
    if mode is AccessMode.READ_WRITE and mechanism == "9p":
        check_user_xattrs(host)
    return ShareSpec(host, check_mount_point(guest_path), mode, mechanism)


def check_user_xattrs(host: Path) -> None:
    """A writable 9p share keeps the guest's owners and modes in ``user.*`` xattrs
    (``security_model=mapped-xattr``): the host filesystem must support them."""
    try:
        os.getxattr(host, "user.capsa.probe")
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            raise ConfigError(
                f"share: {host} is on a filesystem without user xattrs, which a writable 9p share needs",
                hint="share it with mechanism='virtiofs', or READ_ONLY",
            ) from None


def for_template(spec: ShareSpec) -> ShareSpec:
    """What ``auto`` means in a sandbox restored from a template. A read-only share becomes 9p, which
    QEMU migrates once it is unmounted (virtio-fs cannot be migrated, so it would boot cold), with
    the guest caching it (``ls -l`` would otherwise be several times slower than virtio-fs). A
    writable share stays on virtio-fs and boots cold: uncached 9p lists a directory 5-15x slower
    and, to keep set-uid files and device nodes off the host, stores the guest's symlinks and modes
    in xattrs (``mapped-xattr``), which a checkout's tools would not expect. Ask for
    ``mechanism="9p"`` to trade those for a template start."""
    if spec.mechanism != "auto" or not spec.read_only:
        return spec
    return replace(spec, mechanism="9p", guest_cache="loose")


def check_shares(shares: tuple[ShareSpec, ...]) -> None:
    if len(shares) > MAX_SHARES:
        raise ConfigError(f"at most {MAX_SHARES} shares per VM")
    seen: set[str] = set()
    for share in shares:
        if share.guest_path in seen:
            raise ConfigError(f"share: two shares use the guest path {share.guest_path}")
        seen.add(share.guest_path)
