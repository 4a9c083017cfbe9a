"""``capsa.Image``: a user's own guest environment, built once and cached by content hash.

This module holds the public description (:class:`Image`, immutable, cheap to create) and its build
into read-only SquashFS layers under ``<cache>/images/custom/``. Today an image comes from a container
image (``Image.from_oci``: a ``docker save`` / ``podman save`` archive, an OCI layout directory or its
tar), squashed into one layer; recipes (``Image.debian().apt_install(...)...``) will add per-step
layers on the same cache.

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
from typing import Any, Literal

from capsa._paths import cache_dir
from capsa.errors import ImageError
from capsa.image.layers import MERGE_VERSION, merge_layers, squash
from capsa.image.oci import ImageConfig, open_image

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
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
    """A guest environment to run sandboxes in. Create one with :meth:`from_oci`."""

    kind: Literal["oci"]
    source: Path
    name: str

    @classmethod
    def from_oci(cls, path: str | Path, *, name: str | None = None) -> Image:
        """A container image: a ``docker save`` / ``podman save`` archive, an OCI image layout
        directory, or that layout in a tar. Read (and its digests checked) at :meth:`build`."""
        source = Path(path).expanduser().absolute()
        return cls("oci", source, name or source.name)

    def build(self, *, progress: Progress | None = None) -> BuiltImage:
        """Build the image (or find it in the cache) and return its layers; blocking.

        Raises :class:`ImageError` for a missing or malformed archive, a layer whose digest does not
        match, or a layer entry escaping the image root."""
        return _build_oci(self, progress)


def images_root() -> Path:
    return cache_dir() / "images" / "custom"


def _load(directory: Path) -> BuiltImage | None:
    try:
        meta = json.loads((directory / _META).read_text())
        layers = tuple(directory / name for name in meta["layers"])
        if not all(layer.is_file() for layer in layers):
            return None
        return BuiltImage(
            meta["key"], meta["name"], layers, ImageConfig.from_json(meta["config"]), directory
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _build_oci(image: Image, progress: Progress | None) -> BuiltImage:
    archive, manifest = open_image(image.source)
    with archive:
        # The name is baked into the image (the guest reports it), so it is part of the key.
        identity = f"oci:{MERGE_VERSION}:{manifest.digest}:{image.name}"
        key = hashlib.sha256(identity.encode()).hexdigest()[:20]
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

            def write(tar: tarfile.TarFile) -> None:
                merge_layers(archive, manifest.layers, tar, ROOT_PREFIX)
                data = json.dumps(config).encode()
                info = tarfile.TarInfo(IMAGE_CONFIG_NAME)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))

            layer = squash(write, directory / "root.sqfs")
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
