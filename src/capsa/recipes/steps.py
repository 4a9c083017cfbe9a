"""Recipe steps: what each one is (:class:`Step`, made by ``capsa.Image``'s methods and the TOML
loader, each argument checked here), the image config as of a step, and the digests of a step's
host inputs (part of its layer's key). No building here: :mod:`capsa.recipes.recipe` builds."""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from capsa.errors import ConfigError
from capsa.image.context import inside, open_regular
from capsa.image.oci import ImageConfig

MAX_STEPS = 64
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

StepKind = Literal["copy", "env", "workdir", "run", "pip", "apt"]


@dataclass(frozen=True)
class Step:
    """One recipe step. ``args`` and ``options`` are what its layer's key covers (with the content
    of its inputs, hashed at build time)."""

    kind: StepKind
    args: tuple[str, ...]
    options: tuple[tuple[str, str], ...] = ()

    def option(self, name: str, default: str = "") -> str:
        return dict(self.options).get(name, default)

    def describe(self) -> str:
        shown = " ".join(self.args)
        if len(shown) > 70:
            shown = shown[:67] + "..."
        return f"{self.kind} {shown}".rstrip()


# -- step constructors (called by Image's methods and by the TOML loader) --


def _text(value: object, what: str) -> str:
    if not isinstance(value, str) or "\0" in value:
        raise ConfigError(f"{what} must be a string without NUL bytes, got {value!r:.60}")
    return value


def copy_step(context: Path, src: str | Path, dst: str) -> Step:
    """``src`` resolved inside ``context`` (:func:`capsa.image.context.inside`: ConfigError if
    it leaves it); the step keeps the resolved path."""
    _text(dst, "copy()'s destination")
    if not dst:
        raise ConfigError("copy() needs a destination path")
    return Step("copy", (str(inside(context, src, "copy()")), dst))


def env_step(key: str, value: str) -> Step:
    if not isinstance(key, str) or not _ENV_KEY.match(key):
        raise ConfigError(f"env(): invalid variable name {key!r:.60}")
    return Step("env", (key, _text(value, "env()'s value")))


def workdir_step(path: str) -> Step:
    if not _text(path, "workdir()").strip():
        raise ConfigError("workdir() needs a path")
    return Step("workdir", (path,))


def _timeout(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError(f"{what} must be a positive number of seconds, got {value!r:.40}")
    return float(value)


def run_step(command: str, timeout: float, network: bool) -> Step:
    if not _text(command, "run()'s command").strip():
        raise ConfigError("run() needs a shell command")
    options = [("timeout", repr(_timeout(timeout, "run()'s timeout")))]
    if network:
        options.append(("network", "1"))
    return Step("run", (command,), tuple(options))


APT_COMMAND = (
    "export DEBIAN_FRONTEND=noninteractive; apt-get update -q -o Acquire::Retries=3 && "
    "apt-get install -q -y --no-install-recommends {packages} && apt-get clean && "
    "rm -rf /var/lib/apt/lists/* /var/cache/debconf/*-old /var/lib/dpkg/*-old /var/log/apt "
    "/var/log/dpkg.log"
)
_APT_NAME = re.compile(r"^[a-z0-9][a-z0-9+.-]*(:[a-z0-9-]+)?(=[A-Za-z0-9.+~:-]+)?$")


def apt_step(packages: tuple[str, ...], sources: str | None = None) -> Step:
    if not packages:
        raise ConfigError("apt_install() needs at least one package")
    for name in packages:
        if not isinstance(name, str) or not _APT_NAME.match(name):
            raise ConfigError(f"apt_install(): invalid package name {name!r:.60}")
    if sources is None:
        return Step("apt", tuple(packages))
    lines = [line for line in _text(sources, "apt_install()'s sources").splitlines() if line.strip()]
    if not lines or not all(line.lstrip().startswith(("deb ", "#")) for line in lines):
        raise ConfigError(
            "apt_install(): sources must be apt source lines",
            hint="e.g. 'deb [trusted=yes] http://127.0.0.1:8000/ ./'",
        )
    return Step("apt", tuple(packages), (("sources", "\n".join(lines)),))


# -- the config as of each step --


def apply_config(config: ImageConfig, step: Step) -> ImageConfig:
    if step.kind == "env":
        key, value = step.args
        env = (*(pair for pair in config.env if pair[0] != key), (key, value))
        return ImageConfig(env, config.workdir, config.user, config.entrypoint, config.cmd)
    if step.kind == "workdir":
        path = posixpath.normpath(posixpath.join(config.workdir or "/", step.args[0]))
        return ImageConfig(config.env, path, config.user, config.entrypoint, config.cmd)
    return config


def in_workdir(path: str, config: ImageConfig) -> str:
    """An absolute, normalised guest path (relative ones follow the workdir, as in Docker). It
    resolves, for a COPY's target inside a layer tar; the guest never sees it as a request."""
    joined = posixpath.normpath(posixpath.join(config.workdir or "/", path))
    return "/" + joined.lstrip("/")


# -- input digests --


_DIGESTS: dict[str, str] = {}  # stat signature of a tree -> its content digest (this process)


def tree_digest(path: Path) -> str:
    """The content of a host file or directory tree: names, types, modes, bytes, link targets.

    Every ``build()`` of an image computes it; the bytes are read again only when a file's size,
    mtime, inode or mode changed since this process last read them."""
    signature = hashlib.sha256(str(path).encode())
    for rel, entry in walk_tree(path):
        st = entry.lstat()
        signature.update(f"{rel}\0{st.st_mode}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\n".encode())
    cached = _DIGESTS.get(signature.hexdigest())
    if cached is None:
        cached = _DIGESTS[signature.hexdigest()] = _content_digest(path)
    return cached


def _content_digest(path: Path) -> str:
    sha = hashlib.sha256()
    for rel, entry in walk_tree(path):
        st = entry.lstat()
        sha.update(f"{rel}\0{stat.S_IFMT(st.st_mode)}\0{st.st_mode & 0o7777}\0".encode())
        if stat.S_ISLNK(st.st_mode):
            sha.update(os.readlink(entry).encode())
        elif stat.S_ISREG(st.st_mode):
            with open_regular(entry, st.st_size) as fh:
                while chunk := fh.read(1 << 20):
                    sha.update(chunk)
        sha.update(b"\n")
    return sha.hexdigest()


def walk_tree(path: Path) -> Iterator[tuple[str, Path]]:
    """``(relative name, path)`` of ``path`` ("" for itself) and everything below it, sorted."""
    yield "", path
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            dirs.sort()
            base = Path(root)
            for name in sorted(dirs + files):
                entry = base / name
                yield entry.relative_to(path).as_posix(), entry


class Recipe(Protocol):
    """What building needs of an image description (a ``capsa.Image``): its base and its steps.
    Owned here so that the build does not import the description, whose ``build()`` calls it."""

    @property
    def kind(self) -> Literal["oci", "debian"]: ...

    @property
    def source(self) -> Path: ...

    @property
    def name(self) -> str: ...

    @property
    def steps(self) -> tuple[Step, ...]: ...
