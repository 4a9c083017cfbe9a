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


def runtime_base() -> Path:
    """Parent of per-process runtime dirs. Unix socket paths must stay short (108 bytes), so prefer
    ``$XDG_RUNTIME_DIR`` or the system temp dir over the cache dir."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.access(base, os.W_OK):
        return Path(base)
    return Path(tempfile.gettempdir())
