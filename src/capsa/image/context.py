"""A recipe's *context directory*: the only host files a recipe may read.

A recipe can come from someone else (``capsa image build FILE``, ``--image recipe.toml``), so its
``copy`` sources and local ``find_links`` directories resolve inside one directory, as a Docker
build context: a TOML recipe's own directory, or for a recipe built in Python the ``context=`` given
to :meth:`capsa.Image.debian` / :meth:`capsa.Image.from_oci` (default: the current directory when
the step is added). ``~`` is never expanded; a path that is absolute outside the context, climbs
out of it with ``..``, or passes through a symlink that leaves it is a :class:`ConfigError`.

The check is made on the fully resolved path (every symlink followed), which the step then keeps;
the build checks again that nothing on that path became a symlink since (:func:`still_inside`), and
reads files with ``O_NOFOLLOW`` (:func:`open_regular`): a symlink found while walking a copied
directory is copied as a symlink, never followed on the host.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import IO

from capsa.errors import ConfigError, ImageError

_HINT = "give a path inside the recipe's context directory ({context})"


def context_dir(value: str | Path | None) -> Path:
    """The context directory, absolute and resolved (``None``: the current directory)."""
    if value is not None and (not isinstance(value, str | Path) or "\0" in str(value)):
        raise ConfigError(f"context must be a directory path, got {value!r:.60}")
    folder = Path(os.path.realpath(Path.cwd() if value is None else Path(value)))
    if not folder.is_dir():
        raise ConfigError(f"the recipe's context {folder} is not a directory")
    return folder


def inside(context: Path, src: str | Path, what: str) -> Path:
    """``src`` (relative to ``context``, or absolute inside it) resolved, every symlink followed;
    ConfigError when that leaves the context or does not exist."""
    text = os.fspath(src)
    if not isinstance(text, str) or not text or "\0" in text:
        raise ConfigError(f"{what} must be a path, got {src!r:.60}")
    if text.startswith("~"):
        raise ConfigError(
            f"{what}: {text!r} starts with '~': home directories are not expanded",
            hint=_HINT.format(context=context),
        )
    joined = context / text  # an absolute `text` replaces `context`: checked like any other
    real = Path(os.path.realpath(joined))
    if real != context and context not in real.parents:
        raise ConfigError(
            f"{what}: {text!r} resolves to {real}, outside the recipe's context {context}",
            hint=_HINT.format(context=context),
        )
    if not real.exists():
        raise ConfigError(f"{what}: {joined} does not exist")
    return real


def still_inside(path: Path, what: str) -> None:
    """Build time: ``path`` (resolved when its step was made) still has no symlink on it."""
    if os.path.realpath(path) != str(path):
        raise ImageError(
            f"{what}: {path} changed since the recipe was read (a symlink appeared on its path)",
            hint="rebuild from an unchanged context directory",
        )


def open_regular(path: Path, size: int) -> IO[bytes]:
    """``path`` opened for reading if it is still the regular file of ``size`` bytes that was
    listed (never through a symlink, never blocking on a FIFO swapped in)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ImageError(f"cannot read {path}: {exc}") from exc
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size != size:
        os.close(fd)
        raise ImageError(f"{path} changed while it was being copied", hint="build again")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")
