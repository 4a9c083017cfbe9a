"""``capsa.Image``: a user's own guest environment, described immutably and built on demand.

An image comes from a container image (``Image.from_oci``: a ``docker save`` / ``podman save``
archive, an OCI layout directory or its tar), squashed into one layer (:mod:`capsa.image.custom`),
or from a recipe (``Image.debian().apt_install(...)...``) with one cached layer per step, stacked on
capsa's own root (built by :mod:`capsa.recipes.recipe`). An imported image takes the host-only steps
too (``copy``, ``env``, ``workdir``: :data:`HOST_ONLY_STEPS`), stacked on its own root instead of
capsa's. This package sits above the sandbox layer because a recipe's ``run()`` and
``apt_install()`` boot build VMs; a sandbox takes an ``Image`` as a
:class:`capsa.image.custom.ImageSource`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from capsa.errors import ConfigError
from capsa.image.context import context_dir
from capsa.image.custom import BuiltImage, Progress, build_oci
from capsa.recipes.pip import pip_step
from capsa.recipes.recipe import build_recipe
from capsa.recipes.steps import (
    MAX_STEPS,
    Step,
    apt_step,
    copy_step,
    env_step,
    run_step,
    workdir_step,
)

# The steps an imported (OCI) image takes: built on the host, they assume nothing about its root
# (a run(), pip or apt step needs capsa's Debian root: a shell, GNU tar, Python, dpkg).
HOST_ONLY_STEPS = ("copy", "env", "workdir")


@dataclass(frozen=True)
class Image:
    """A guest environment to run sandboxes in: :meth:`from_oci`, or a recipe from :meth:`debian`.

    Recipe steps return a new image (the description is immutable); nothing is built until
    :meth:`build` (or a sandbox's ``build()``), and each step's layer is cached on its own."""

    kind: Literal["oci", "debian"]
    source: Path  # the archive (oci); unused for a recipe
    name: str
    steps: tuple[Step, ...] = ()
    # The only host directory copy() and find_links= read from (None: the current directory when
    # a step is added); see capsa.image.context.
    context: Path | None = None

    @classmethod
    def debian(cls, *, name: str = "debian", context: str | Path | None = None) -> Image:
        """capsa's default root (Debian bookworm with python3 and pip) as the base of a recipe.

        ``context`` is the directory whose files the recipe's ``copy()`` and ``find_links=`` may
        read (nothing outside it); by default the current directory when the step is added."""
        if not isinstance(name, str) or not name or "\0" in name or "/" in name:
            raise ConfigError(f"invalid image name {name!r}")
        return cls("debian", Path("/"), name, context=_context(context))

    def _context_dir(self) -> Path:
        return context_dir(self.context)

    def _step(self, step: Step) -> Image:

        if self.kind != "debian" and step.kind not in HOST_ONLY_STEPS:
            raise ConfigError(
                f"{step.kind}() steps build on capsa.Image.debian(), not on an imported image",
                hint="an imported image takes copy(), env() and workdir() steps; run commands or "
                "install packages when building the container image (its Dockerfile), or start "
                "the recipe with capsa.Image.debian()",
            )
        if len(self.steps) >= MAX_STEPS:
            raise ConfigError(f"a recipe has at most {MAX_STEPS} steps", hint="merge run() steps")
        return dataclasses.replace(self, steps=(*self.steps, step))

    def copy(self, src: str | Path, dst: str) -> Image:
        """Copy a host file or directory into the image, as Docker's COPY: a directory's contents
        land at ``dst``; a file lands at ``dst`` (inside it when ``dst`` ends with ``/``). Owned
        by root, modes kept, symlinks inside a directory copied as links. A relative ``dst``
        follows :meth:`workdir`. ``src`` is relative to the recipe's context directory (or absolute
        inside it); anything that resolves outside it (``..``, ``~``, a symlink) is a ConfigError."""

        return self._step(copy_step(self._context_dir(), src, dst))

    def env(self, key: str, value: str) -> Image:
        """Set an environment variable for later ``run()`` steps and every command in the sandbox."""

        return self._step(env_step(key, value))

    def workdir(self, path: str) -> Image:
        """The working directory of later ``run()`` steps and of commands without ``.cwd()``."""

        return self._step(workdir_step(path))

    def run(self, command: str, *, timeout: float = 1800.0, network: bool = False) -> Image:
        """Run a shell command in a build VM booted on the image so far and keep what it changed
        as a layer. A non-zero exit raises :class:`ImageError` with the output. ``network=True``
        gives the build VM capsa's NAT (no policy); the default is no network."""

        return self._step(run_step(command, timeout, network))

    def pip_install(
        self,
        *requirements: str,
        index_url: str | None = None,
        find_links: str | Path | None = None,
    ) -> Image:
        """Install binary wheels for the guest's Python (3.11, x86_64 manylinux), resolved and
        unpacked on the host (no build VM, no root) into ``/usr/local/lib/python3.11/dist-packages``.
        ``find_links`` (a wheel directory inside the context directory, or an http(s) URL) without
        ``index_url`` installs from that directory only. Requirements are names with versions:
        URLs, paths and direct references (``name @ url``) are refused, and nothing is ever built."""

        context = self._context_dir() if find_links is not None else None
        return self._step(pip_step(requirements, index_url, find_links, context))

    def apt_install(self, *packages: str, sources: str | None = None) -> Image:
        """Install Debian packages with their dependencies: resolved and downloaded by the host's
        apt (the host's Debian sources, or ``sources``: apt source lines), installed by ``dpkg -i``
        in a build VM (see docs/images.md for why)."""

        return self._step(apt_step(packages, sources))

    @classmethod
    def from_oci(
        cls, path: str | Path, *, name: str | None = None, context: str | Path | None = None
    ) -> Image:
        """A container image: a ``docker save`` / ``podman save`` archive, an OCI image layout
        directory, or that layout in a tar. Read (and its digests checked) at :meth:`build`.
        ``context``: where its ``copy()`` steps read from, as for :meth:`debian`."""
        source = Path(path).expanduser().absolute()
        return cls("oci", source, name or source.name, context=_context(context))

    def build(self, *, progress: Progress | None = None) -> BuiltImage:
        """Build the image (or find it in the cache) and return its layers; blocking.

        Raises :class:`ImageError` for a missing or malformed archive, a layer whose digest does not
        match, a layer entry escaping the image root, or a recipe step that fails."""
        if self.kind == "debian" or self.steps:
            return build_recipe(self, progress)
        return build_oci(self.source, self.name, progress)


def _context(value: str | Path | None) -> Path | None:
    return None if value is None else context_dir(value)
