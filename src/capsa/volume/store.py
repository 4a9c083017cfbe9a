"""Volumes on the host: one preallocated ext4 image per volume in a store directory.

Why an image file attached as a virtio-blk disk (not a host directory over virtio-fs): the size limit
is the filesystem's own (a guest writing past it gets ENOSPC from its kernel; the host file never
grows), the host never parses what a guest wrote (the guest's kernel does, inside the VM), and a
sandbox with a volume can be paused and resumed like any other (QEMU cannot migrate virtio-fs).
The image is preallocated, so a full host disk can never fail a guest's write half-way.

Creating a volume runs ``mke2fs`` (e2fsprogs) on a fresh file: it writes a filesystem and reads
nothing a guest wrote. The image appears under its final name only once it is complete (made as a
hidden partial file, then linked in), so a crash while creating leaves no half-made volume, and
``VolumeStore`` removes partial files whose process has died."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from capsa.errors import VolumeError
from capsa.volume.lock import lock_volume
from capsa.volume.names import check_name

log = logging.getLogger(__name__)

SUFFIX = ".ext4"
DEFAULT_SIZE_MB = 1024
MIN_SIZE_MB = 16  # room for ext4's journal and metadata
MAX_SIZE_MB = 1 << 20  # 1 TiB
_MKFS_TIMEOUT = 120.0
_PARTIAL = ".partial-"


def default_root() -> Path:
    """``$CAPSA_VOLUME_DIR``, else ``$XDG_DATA_HOME/capsa/volumes``, else
    ``~/.local/share/capsa/volumes``: user data, so neither the cache (which may be wiped at any
    time) nor state (which XDG keeps for what a program can rebuild)."""
    explicit = os.environ.get("CAPSA_VOLUME_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "capsa" / "volumes"


def check_size_mb(size_mb: object) -> int:
    if isinstance(size_mb, bool) or not isinstance(size_mb, int):
        raise VolumeError(f"size_mb must be an integer number of MiB, got {size_mb!r:.40}")
    if not MIN_SIZE_MB <= size_mb <= MAX_SIZE_MB:
        raise VolumeError(f"size_mb must be from {MIN_SIZE_MB} to {MAX_SIZE_MB}, got {size_mb}")
    return size_mb


@dataclass(frozen=True)
class Volume:
    """A named ext4 filesystem image that outlives sandboxes. Mount it with
    ``capsa.sandbox().volume(vol, "/data")``."""

    name: str
    path: Path

    @property
    def size_mb(self) -> int:
        return self.path.stat().st_size >> 20


class VolumeStore:
    """The volumes of one directory (the library's default one, or a server tenant's)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_root()

    def path(self, name: str) -> Path:
        return self.root / f"{check_name(name)}{SUFFIX}"

    def open(self, name: str) -> Volume:
        path = self.path(name)
        if not path.is_file() or path.is_symlink():
            raise VolumeError(
                f"volume {name} does not exist", name=name, hint="create it with capsa.volume(name)"
            )
        return Volume(name, path)

    def get(self, name: str, size_mb: int | None = None) -> Volume:
        """Open ``name``, creating it (``size_mb``, by default 1 GiB) when it does not exist. An
        existing volume of another size is an error rather than silently not what was asked."""
        path = self.path(name)
        if path.exists():
            volume = self.open(name)
            if size_mb is not None and volume.size_mb != check_size_mb(size_mb):
                raise VolumeError(
                    f"volume {name} exists with {volume.size_mb} MiB, not {size_mb}",
                    name=name,
                    hint="open it without size_mb, or remove it first",
                )
            return volume
        try:
            return self.create(name, DEFAULT_SIZE_MB if size_mb is None else size_mb)
        except FileExistsError:  # created by someone else meanwhile
            return self.open(name)

    def create(self, name: str, size_mb: int = DEFAULT_SIZE_MB) -> Volume:
        """A new, empty volume (``FileExistsError`` if the name is taken)."""
        path = self.path(name)
        size_mb = check_size_mb(size_mb)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.sweep()
        partial = self.root / f".{name}{_PARTIAL}{os.getpid()}"
        try:
            _make_image(partial, name, size_mb)
            os.link(partial, path)  # atomic, and never replaces an existing volume
        finally:
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()
        log.info("created volume %s (%d MiB) at %s", name, size_mb, path)
        return Volume(name, path)

    def list(self) -> list[Volume]:
        if not self.root.is_dir():
            return []
        found = []
        for entry in sorted(self.root.iterdir()):
            stem = entry.name[: -len(SUFFIX)]
            if entry.name.endswith(SUFFIX) and not entry.name.startswith(".") and entry.is_file():
                with contextlib.suppress(VolumeError):
                    found.append(Volume(check_name(stem), entry))
        return found

    def remove(self, name: str) -> None:
        """Delete a volume and its content. Refused (:class:`VolumeError`) while a sandbox has it
        mounted: its lock is taken first, so no VM can attach it meanwhile."""
        path = self.open(name).path
        fd = lock_volume(path, exclusive=True, name=name)
        try:
            path.unlink()
        finally:
            os.close(fd)
        log.info("removed volume %s", name)

    def sweep(self) -> None:
        """Remove the partial images of processes that died while creating a volume."""
        if not self.root.is_dir():
            return
        for entry in self.root.iterdir():
            _, _, pid = entry.name.rpartition(_PARTIAL)
            if entry.name.startswith(".") and pid.isdigit() and not _alive(int(pid)):
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()


def _make_image(path: Path, name: str, size_mb: int) -> None:
    mkfs = shutil.which("mke2fs") or shutil.which("mke2fs", path="/usr/sbin:/sbin")
    debugfs = shutil.which("debugfs") or shutil.which("debugfs", path="/usr/sbin:/sbin")
    if mkfs is None or debugfs is None:
        raise VolumeError(
            "creating a volume needs mke2fs and debugfs", name=name, hint="install e2fsprogs"
        )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.posix_fallocate(fd, 0, size_mb << 20)
    except OSError as exc:
        raise VolumeError(
            f"no room for a {size_mb} MiB volume in {path.parent}: {exc.strerror}",
            name=name,
            hint="volumes are preallocated; free space or pick a smaller size_mb",
        ) from None
    finally:
        os.close(fd)
    # -m 0: no blocks reserved for root (the whole size is the user's); a journal, so a guest or
    # host crash mid-write leaves a filesystem that replays to consistent at the next mount.
    # Inode tables and journal written now, not lazily by the guest kernel after its first mount:
    # a background writer would change the volume under a snapshot (see Sandbox.snapshot).
    extended = "root_owner=0:0,lazy_itable_init=0,lazy_journal_init=0,nodiscard"  # keep the space
    _run([mkfs, "-q", "-F", "-t", "ext4", "-m", "0", "-E", extended, str(path)], name)
    # The root directory like /tmp (1777): any guest user may create files, not only root.
    _run([debugfs, "-w", "-R", "set_inode_field / mode 041777", str(path)], name)
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def _run(argv: list[str], name: str) -> None:
    try:
        done = subprocess.run(argv, capture_output=True, timeout=_MKFS_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise VolumeError(f"{argv[0]} did not finish within {_MKFS_TIMEOUT:.0f}s", name=name) from None
    if done.returncode != 0:
        output = (done.stdout + done.stderr).decode(errors="replace").strip()[-500:]
        raise VolumeError(f"{Path(argv[0]).name} failed for volume {name}: {output}", name=name)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
