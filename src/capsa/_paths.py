"""Where capsa keeps its cache (images, kernels, probe verdicts) and per-VM runtime directories."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    """``$CAPSA_CACHE_DIR``, else ``$XDG_CACHE_HOME/capsa``, else ``~/.cache/capsa``."""
    explicit = os.environ.get("CAPSA_CACHE_DIR")
    if explicit:
        path = Path(explicit)
    else:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        path = Path(base) / "capsa"
    path.mkdir(parents=True, exist_ok=True)
    return path


SHM = Path("/dev/shm")
MIN_SHM_FREE = 1 << 30  # containers often mount a 64 MiB /dev/shm: too small for memory images


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def runtime_base() -> Path:
    """Parent of per-process runtime dirs. Unix socket paths must stay short (108 bytes), and the
    memory images of forks live here, so prefer RAM-backed ``$XDG_RUNTIME_DIR`` or a roomy
    ``/dev/shm`` (an image written into a disk filesystem through QEMU's mapping costs a block
    allocation per page) over the system temp dir."""
    for base in (os.environ.get("XDG_RUNTIME_DIR"), str(SHM)):
        usable = base and os.path.isdir(base) and os.access(base, os.W_OK | os.X_OK)
        if usable and (base != str(SHM) or free_bytes(SHM) >= MIN_SHM_FREE):
            return Path(str(base))
    return Path(tempfile.gettempdir())


def write_atomic(path: Path, text: str) -> None:
    """Publish ``text`` as ``path`` in one step: written to a hidden file beside it (named with this
    process's id, so two writers never share one), then renamed over it. A reader sees the old file
    or the whole new one, never part of it; a crash leaves at most the hidden file."""
    partial = path.with_name(f".{path.name}.part-{os.getpid()}")
    try:
        partial.write_text(text)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
