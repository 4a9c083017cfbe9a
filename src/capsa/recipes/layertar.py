"""The tar a layer's SquashFS is made from: entries under ``rootfs/``, every parent directory
given an explicit entry once, and Docker COPY of a host tree (:func:`add_host_tree`)."""

from __future__ import annotations

import io
import logging
import os
import posixpath
import stat
import tarfile
import time
from pathlib import Path
from typing import Any

from capsa.errors import ImageError
from capsa.image.context import open_regular, still_inside
from capsa.image.custom import ROOT_PREFIX
from capsa.recipes.steps import walk_tree

log = logging.getLogger(__name__)

# Directories a layer creates implicitly (the parents of what it adds) keep the base's modes.
_STICKY = {"tmp", "var/tmp"}


# -- writing a layer's tar --


class LayerTar:
    """Adds entries under ``rootfs/`` to the tar streamed into ``tar2sqfs``, giving every parent
    directory an explicit entry (root-owned, 0755; 1777 for /tmp and /var/tmp) once."""

    def __init__(self, tar: tarfile.TarFile) -> None:
        self.tar = tar
        self.dirs: set[str] = set()
        self._dir("", 0o755)

    def _dir(self, path: str, mode: int) -> None:
        info = tarfile.TarInfo((ROOT_PREFIX + path).rstrip("/"))
        info.type, info.mode, info.mtime = tarfile.DIRTYPE, mode, int(time.time())
        self.tar.addfile(info)
        self.dirs.add(path)

    def parents(self, path: str) -> None:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            folder = "/".join(parts[:i])
            if folder not in self.dirs:
                self._dir(folder, 0o1777 if folder in _STICKY else 0o755)

    def add(self, info: tarfile.TarInfo, data: io.BufferedIOBase | Any = None) -> None:
        """``info.name`` is the guest path without its leading ``/``."""
        path = posixpath.normpath("/" + info.name).strip("/")
        if not path or ".." in info.name.split("/"):
            raise ImageError(f"a layer entry escapes the image root: {info.name!r}")
        self.parents(path)
        if info.isdir():
            if path in self.dirs:
                return
            self.dirs.add(path)
        info.name = ROOT_PREFIX + path
        if info.islnk():
            target = posixpath.normpath("/" + info.linkname).strip("/")
            if not target or ".." in info.linkname.split("/"):
                raise ImageError(f"a hard link escapes the image root: {info.linkname!r}")
            info.linkname = ROOT_PREFIX + target
        info.uname = info.gname = ""
        self.tar.addfile(info, data)


def add_host_tree(layer: LayerTar, src: Path, dst: str) -> int:
    """Docker COPY of ``src`` to the absolute guest path ``dst``; returns the number of entries.
    Symlinks below ``src`` are copied as links, never followed (``src`` itself was resolved inside
    the recipe's context when the step was made)."""
    still_inside(src, "copy()")
    target = dst.strip("/")
    if src.is_dir() and not src.is_symlink():
        base = target
    elif dst.endswith("/"):
        base = f"{target}/{src.name}".strip("/")
    else:
        base = target
    count = 0
    for rel, entry in walk_tree(src):
        path = f"{base}/{rel}".strip("/") if rel else base
        if not path:
            continue  # the directory's contents go into / itself
        st = entry.lstat()
        info = tarfile.TarInfo(path)
        info.mode, info.uid, info.gid, info.mtime = st.st_mode & 0o7777, 0, 0, int(st.st_mtime)
        if stat.S_ISDIR(st.st_mode):
            info.type = tarfile.DIRTYPE
            layer.add(info)
        elif stat.S_ISLNK(st.st_mode):
            info.type, info.linkname = tarfile.SYMTYPE, os.readlink(entry)
            layer.add(info)
        elif stat.S_ISREG(st.st_mode):
            info.size = st.st_size
            with open_regular(entry, st.st_size) as fh:
                layer.add(info, fh)
        else:
            log.info("copy: skipping %s (not a file, directory or symlink)", entry)
            continue
        count += 1
    return count
