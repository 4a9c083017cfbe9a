"""A sandbox built on a user image (``capsa.Image``): the agent enters the user's root.

The init mounts the image under its own tmpfs layer at :data:`USER_ROOT` inside capsa's root (with
``/proc``, ``/sys`` and ``/dev`` bound into it) and copies the image's config to :data:`IMAGE_CONFIG`.
The agent starts from capsa's root, where its Python and msgpack live, imports all it needs, then
``chroot``s into the user's root: every command and file operation from then on happens there, so an
image without Python (busybox, alpine) works. The chroot separates roots for function, not security:
commands in the guest run as root and the guest VM is the boundary.

The image config's ``Env`` and ``WorkingDir`` become exec defaults (a request's own values win).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

USER_ROOT = "/run/capsa/root"  # same as capsa.image.sandbox.USER_ROOT
IMAGE_CONFIG = "/run/capsa/image.json"  # same as capsa.image.sandbox.IMAGE_CONFIG_COPY
_MAX_CONFIG = 1 << 20


@dataclass(frozen=True)
class ImageDefaults:
    name: str = ""
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    user: str | None = None


def _parse(data: bytes) -> ImageDefaults:
    import json  # noqa: PLC0415 - only with a user image, before the chroot

    raw = json.loads(data)
    env = {
        str(k): str(v)
        for k, v in raw.get("env", [])
        if isinstance(k, str) and k and "=" not in k and "\0" not in k + str(v)
    }
    cwd = raw.get("workdir")
    user = raw.get("user")
    return ImageDefaults(
        name=str(raw.get("name") or ""),
        env=env,
        cwd=cwd if isinstance(cwd, str) and cwd.startswith("/") and "\0" not in cwd else None,
        user=user if isinstance(user, str) else None,
    )


def enter_user_root() -> ImageDefaults | None:
    """As PID 1 only: if the init set up a user root, chroot into it and return its defaults."""
    try:
        with open(IMAGE_CONFIG, "rb") as fh:
            data = fh.read(_MAX_CONFIG)
    except FileNotFoundError:
        return None
    defaults = _parse(data)
    # Modules the agent imports lazily must be loaded now: capsa's root is out of reach afterwards.
    import ctypes  # noqa: F401, PLC0415
    import shutil  # noqa: F401, PLC0415

    os.chroot(USER_ROOT)
    os.chdir("/")
    return defaults


@dataclass(frozen=True)
class Identity:
    uid: int
    gid: int
    home: str | None


def _table(path: str) -> list[list[str]]:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return [line.rstrip("\n").split(":") for line in fh if not line.startswith("#")]
    except OSError:
        return []


def resolve_user(spec: str, root: str = "") -> Identity:
    """``uid``, ``uid:gid``, ``name`` or ``name:group`` (Docker's ``User``) from the current root's
    ``/etc/passwd`` and ``/etc/group``, read directly (an image may have no NSS libraries).
    Raises ValueError for an unknown name. ``root`` prefixes the two files (tests)."""
    user, _, group = spec.partition(":")
    home: str | None = None
    gid: int | None = None
    if user.isdigit():
        uid = int(user)
        entries = [e for e in _table(root + "/etc/passwd") if len(e) >= 6 and e[2] == user]
    else:
        entries = [e for e in _table(root + "/etc/passwd") if len(e) >= 6 and e[0] == user]
        if not entries or not entries[0][2].isdigit():
            raise ValueError(f"no user {user!r} in the image's /etc/passwd")
        uid = int(entries[0][2])
    if entries:
        home = entries[0][5] or None
        gid = int(entries[0][3]) if entries[0][3].isdigit() else None
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            found = [e for e in _table(root + "/etc/group") if len(e) >= 3 and e[0] == group]
            if not found or not found[0][2].isdigit():
                raise ValueError(f"no group {group!r} in the image's /etc/group")
            gid = int(found[0][2])
    if not (0 <= uid < 1 << 32) or (gid is not None and not 0 <= gid < 1 << 32):
        raise ValueError(f"user {spec!r} is out of range")
    return Identity(uid, gid if gid is not None else 0, home)  # Docker's default group: 0
