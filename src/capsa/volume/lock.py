"""Who may use a volume at once. A volume is an ext4 filesystem that a guest kernel mounts, and two
kernels writing one ext4 image corrupt it, so a running VM holds a ``flock`` on the image for as long
as it runs: exclusive when it mounts it read-write, shared when read-only (so: one writer, or any
number of readers). Removing a volume takes the exclusive lock, so it fails while any VM holds it.

``flock`` locks belong to the open file description: they are dropped when the descriptor closes,
including when the holding process dies, so a crash never leaves a volume locked."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from capsa.errors import VolumeError


def lock_volume(path: Path, *, exclusive: bool, name: str) -> int:
    """An open descriptor holding the volume's lock (close it to release), or :class:`VolumeError`
    when another VM holds a conflicting one or the image is gone."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise VolumeError(f"volume {name} does not exist ({path})", name=name) from None
    except OSError as exc:
        raise VolumeError(f"volume {name}: cannot open {path}: {exc.strerror}", name=name) from None
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        how = "mounted by a running sandbox" if exclusive else "mounted read-write by a running sandbox"
        raise VolumeError(
            f"volume {name} is {how}",
            name=name,
            hint="a volume is mounted read-write by one sandbox at a time (read-only by many); "
            "stop the other sandbox first",
        ) from None
    # Removed (or replaced) between our open and our lock: the descriptor is a deleted image.
    try:
        same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        same = False
    if not same:
        os.close(fd)
        raise VolumeError(f"volume {name} was removed", name=name)
    return fd
