"""``capsa.Image``: a user's own guest environment, built once and cached by content hash.

This module holds the public description (:class:`Image`, immutable, cheap to create) and its build
into read-only SquashFS layers under ``<cache>/images/``. An image comes from a container image
(``Image.from_oci``: a ``docker save`` / ``podman save`` archive, an OCI layout directory or its tar),
squashed into one layer, or from a recipe (``Image.debian().apt_install(...)...``) with one cached
layer per step, stacked on capsa's own root (built by :mod:`capsa.image.recipe`). An imported image
takes the host-only steps too (``copy``, ``env``, ``workdir``: :data:`HOST_ONLY_STEPS`), stacked on
its own root instead of capsa's.

A built image is a :class:`BuiltImage`: its layers (bottom first) and the config whose ``Env``,
``WorkingDir`` and ``User`` become exec defaults in the guest. A build is atomic: the metadata file is
written last, so an interrupted build is simply redone and never used half-made.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import io
import json
import logging
import os
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from capsa._paths import cache_dir
from capsa.errors import ConfigError, ImageError
from capsa.image.context import context_dir
from capsa.image.layers import MERGE_VERSION, import_layers
from capsa.image.oci import ImageConfig, open_image

if TYPE_CHECKING:
    from capsa.image.recipe import Step

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
# The steps an imported (OCI) image takes: built on the host, they assume nothing about its root
# (a run(), pip or apt step needs capsa's Debian root: a shell, GNU tar, Python, dpkg).
HOST_ONLY_STEPS = ("copy", "env", "workdir")
_META = "image.json"
# Inside each layer's SquashFS: the user's tree under ROOT_PREFIX, and the image's config beside it
# (read by the guest's init for exec defaults, invisible in the user's root).
ROOT_PREFIX = "rootfs/"
IMAGE_CONFIG_NAME = "capsa-image.json"


@dataclass(frozen=True)
class BuiltImage:
    """An image on disk: read-only SquashFS layers (bottom first) and its exec defaults."""

    key: str
    name: str
    layers: tuple[Path, ...]
    config: ImageConfig
    directory: Path

    @property
    def size(self) -> int:
        return sum(layer.stat().st_size for layer in self.layers)


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
        from capsa.image.recipe import MAX_STEPS  # noqa: PLC0415 - recipe imports this module

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
        from capsa.image.recipe import copy_step  # noqa: PLC0415

        return self._step(copy_step(self._context_dir(), src, dst))

    def env(self, key: str, value: str) -> Image:
        """Set an environment variable for later ``run()`` steps and every command in the sandbox."""
        from capsa.image.recipe import env_step  # noqa: PLC0415

        return self._step(env_step(key, value))

    def workdir(self, path: str) -> Image:
        """The working directory of later ``run()`` steps and of commands without ``.cwd()``."""
        from capsa.image.recipe import workdir_step  # noqa: PLC0415

        return self._step(workdir_step(path))

    def run(self, command: str, *, timeout: float = 1800.0, network: bool = False) -> Image:
        """Run a shell command in a build VM booted on the image so far and keep what it changed
        as a layer. A non-zero exit raises :class:`ImageError` with the output. ``network=True``
        gives the build VM capsa's NAT (no policy); the default is no network."""
        from capsa.image.recipe import run_step  # noqa: PLC0415

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
        from capsa.image.recipe_pip import pip_step  # noqa: PLC0415

        context = self._context_dir() if find_links is not None else None
        return self._step(pip_step(requirements, index_url, find_links, context))

    def apt_install(self, *packages: str, sources: str | None = None) -> Image:
        """Install Debian packages with their dependencies: resolved and downloaded by the host's
        apt (the host's Debian sources, or ``sources``: apt source lines), installed by ``dpkg -i``
        in a build VM (see docs/images.md for why)."""
        from capsa.image.recipe import apt_step  # noqa: PLC0415

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
            from capsa.image.recipe import build_recipe  # noqa: PLC0415

            return build_recipe(self, progress)
        return _build_oci(self, progress)


def _context(value: str | Path | None) -> Path | None:
    return None if value is None else context_dir(value)


def images_root() -> Path:
    return cache_dir() / "images" / "custom"


def _load(directory: Path) -> BuiltImage | None:
    try:
        meta = json.loads((directory / _META).read_text())
        # Names relative to the image's directory (a recipe's step layers live in a shared folder).
        layers = tuple(Path(os.path.normpath(directory / name)) for name in meta["layers"])
        if not all(layer.is_file() for layer in layers):
            return None
        return BuiltImage(
            meta["key"], meta["name"], layers, ImageConfig.from_json(meta["config"]), directory
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def oci_base(image: Image) -> tuple[str, ImageConfig]:
    """The cache key and config of an imported image (its recipe steps aside): reads the manifest."""
    archive, manifest = open_image(image.source)
    with archive:
        return _oci_key(image, manifest.digest), manifest.config


def _oci_key(image: Image, digest: str) -> str:
    # The name is baked into the image (the guest reports it), so it is part of the key.
    identity = f"oci:{MERGE_VERSION}:{digest}:{image.name}"
    return hashlib.sha256(identity.encode()).hexdigest()[:20]


def build_oci(image: Image, progress: Progress | None) -> BuiltImage:
    """Import the container image of ``image`` (its recipe steps aside)."""
    return _build_oci(dataclasses.replace(image, steps=()), progress)


def _build_oci(image: Image, progress: Progress | None) -> BuiltImage:
    archive, manifest = open_image(image.source)
    with archive:
        key = _oci_key(image, manifest.digest)
        directory = images_root() / key
        built = _load(directory)
        if built is not None:
            _touch(directory)
            return built
        directory.mkdir(parents=True, exist_ok=True)
        with (directory / ".lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same image
            built = _load(directory)
            if built is not None:
                return built
            if progress:
                progress(f"importing {image.source.name}: {len(manifest.layers)} layers")
            started = time.monotonic()
            config = manifest.config.to_json() | {"name": image.name, "key": key}

            def add_config(tar: tarfile.TarFile) -> None:
                data = json.dumps(config).encode()
                info = tarfile.TarInfo(IMAGE_CONFIG_NAME)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))

            layer = import_layers(
                archive, manifest.layers, directory / "root.sqfs", ROOT_PREFIX, add_config
            )
            log.info("imported %s in %.1fs", image.source, time.monotonic() - started)
            meta: dict[str, Any] = {
                "key": key,
                "name": image.name,
                "source": str(image.source),
                "digest": manifest.digest,
                "layers": [layer.name],
                "config": manifest.config.to_json(),
            }
            partial = directory / f".{_META}.part"
            partial.write_text(json.dumps(meta, indent=1))
            os.replace(partial, directory / _META)
    built = _load(directory)
    if built is None:
        raise ImageError(f"the image built in {directory} cannot be read back")
    return built


def _touch(directory: Path) -> None:
    """Records "last used" for ``capsa image ls`` and pruning (never the layers: their identity)."""
    try:
        (directory / ".used").touch()
    except OSError as exc:
        log.debug("cannot mark %s used: %s", directory, exc)
