"""Built images: a user image's read-only SquashFS layers under ``<cache>/images/`` and their
config, and the import of a container image (``docker save`` / ``podman save`` archive, OCI layout or
its tar) squashed into one layer. The description users write (``capsa.Image``) and recipe building
live in :mod:`capsa.recipes`, above the sandbox layer (a recipe's ``run()`` boots build VMs); the
sandbox layer takes anything with a ``build()`` returning a :class:`BuiltImage`
(:class:`ImageSource`).

A built image is a :class:`BuiltImage`: its layers (bottom first) and the config whose ``Env``,
``WorkingDir`` and ``User`` become exec defaults in the guest. A build is atomic: the metadata file is
written last, so an interrupted build is simply redone and never used half-made.
"""

from __future__ import annotations

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
from typing import Any, Protocol, runtime_checkable

from capsa._paths import cache_dir, write_atomic
from capsa.errors import ImageError
from capsa.image.layers import MERGE_VERSION, import_layers
from capsa.image.oci import ImageConfig, open_image

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
META_NAME = "image.json"
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


@runtime_checkable
class ImageSource(Protocol):
    """What a sandbox needs of its image (a ``capsa.Image``): built, its layers. Owned here so that
    the sandbox layer does not import recipe building, which boots sandboxes."""

    def build(self, *, progress: Progress | None = None) -> BuiltImage:
        """Build the image (or find it in the cache) and return its layers; blocking."""
        ...


def images_root() -> Path:
    return cache_dir() / "images" / "custom"


def load_built(directory: Path) -> BuiltImage | None:
    try:
        meta = json.loads((directory / META_NAME).read_text())
        # Names relative to the image's directory (a recipe's step layers live in a shared folder).
        layers = tuple(Path(os.path.normpath(directory / name)) for name in meta["layers"])
        if not all(layer.is_file() for layer in layers):
            return None
        return BuiltImage(
            meta["key"], meta["name"], layers, ImageConfig.from_json(meta["config"]), directory
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def oci_base(source: Path, name: str) -> tuple[str, ImageConfig]:
    """The cache key and config of the container image at ``source`` imported as ``name``: reads
    the manifest."""
    archive, manifest = open_image(source)
    with archive:
        return _oci_key(name, manifest.digest), manifest.config


def _oci_key(name: str, digest: str) -> str:
    # The name is baked into the image (the guest reports it), so it is part of the key.
    identity = f"oci:{MERGE_VERSION}:{digest}:{name}"
    return hashlib.sha256(identity.encode()).hexdigest()[:20]


def build_oci(source: Path, name: str, progress: Progress | None) -> BuiltImage:
    """Import the container image at ``source`` (an archive or layout) as ``name``, or find it in
    the cache."""
    archive, manifest = open_image(source)
    with archive:
        key = _oci_key(name, manifest.digest)
        directory = images_root() / key
        built = load_built(directory)
        if built is not None:
            touch_used(directory)
            return built
        directory.mkdir(parents=True, exist_ok=True)
        with (directory / ".lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same image
            built = load_built(directory)
            if built is not None:
                return built
            if progress:
                progress(f"importing {source.name}: {len(manifest.layers)} layers")
            started = time.monotonic()
            config = manifest.config.to_json() | {"name": name, "key": key}

            def add_config(tar: tarfile.TarFile) -> None:
                data = json.dumps(config).encode()
                info = tarfile.TarInfo(IMAGE_CONFIG_NAME)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))

            layer = import_layers(
                archive, manifest.layers, directory / "root.sqfs", ROOT_PREFIX, add_config
            )
            log.info("imported %s in %.1fs", source, time.monotonic() - started)
            meta: dict[str, Any] = {
                "key": key,
                "name": name,
                "source": str(source),
                "digest": manifest.digest,
                "layers": [layer.name],
                "config": manifest.config.to_json(),
            }
            return publish_built(directory, meta)
    built = load_built(directory)
    if built is None:
        raise ImageError(f"the image built in {directory} cannot be read back")
    return built


def publish_built(directory: Path, meta: dict[str, Any]) -> BuiltImage:
    """Make the image in ``directory`` visible: its ``image.json`` written in one step, then read
    back through :func:`load_built` (as every later user reads it), so a record that does not load
    fails the build that wrote it instead of a later run. Used by imports and recipe builds alike."""
    write_atomic(directory / META_NAME, json.dumps(meta, indent=1))
    built = load_built(directory)
    if built is None:
        raise ImageError(f"the image built in {directory} cannot be read back")
    return built


def touch_used(directory: Path) -> None:
    """Records "last used" for ``capsa image ls`` and pruning (never the layers: their identity)."""
    try:
        (directory / ".used").touch()
    except OSError as exc:
        log.debug("cannot mark %s used: %s", directory, exc)
