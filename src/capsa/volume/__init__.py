"""Volumes: named persistent filesystems that outlive sandboxes (docs/volumes.md)."""

from __future__ import annotations

from pathlib import Path

from capsa.volume.names import check_name
from capsa.volume.spec import VolumeMount
from capsa.volume.store import Volume, VolumeStore, default_root


def volume(name: str, size_mb: int | None = None, *, root: str | Path | None = None) -> Volume:
    """Open the volume ``name``, creating it (``size_mb`` MiB, by default 1024) if it does not exist,
    in ``root`` (by default ``$XDG_DATA_HOME/capsa/volumes``). Creating one runs ``mke2fs`` (well
    under a second); opening one only checks that it exists."""
    return VolumeStore(Path(root) if root is not None else None).get(name, size_mb)


__all__ = ["Volume", "VolumeMount", "VolumeStore", "check_name", "default_root", "volume"]
