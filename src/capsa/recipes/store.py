"""Named user images: ``capsa image import ARCHIVE --name NAME`` and ``--image NAME``.

A small registry under ``<cache>/images/named/``: one ``NAME.json`` per image (written atomically,
last, so a half-made import is never visible) that records what the name was built from (an OCI
archive or layout, or a TOML recipe) and the built layers. A named image resolves without its source:
the archive may be deleted after the import; it is read again only if the layers are gone from the
cache. ``NAME.used`` is touched whenever a sandbox builds from the image (``capsa image ls``).

:func:`resolve_image` turns what a user types (``--image``, the pytest marker's ``image=``) into a
:class:`capsa.Image`: a registered name, a ``.toml`` recipe, or an archive / layout directory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capsa._paths import cache_dir, write_atomic
from capsa.errors import ConfigError, ImageError
from capsa.image.custom import BuiltImage, images_root
from capsa.image.oci import ImageConfig
from capsa.recipes.image import Image
from capsa.recipes.toml import load_recipe

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_SUFFIX = ".json"
_USED = ".used"


@dataclass(frozen=True)
class NamedImage:
    """One registry entry: a name, what it was built from and the built layers (bottom first)."""

    name: str
    kind: str  # "oci" | "recipe"
    source: str
    key: str
    directory: str
    layers: tuple[str, ...]
    config: dict[str, Any]
    created: float

    @property
    def size(self) -> int:
        """Bytes on disk of its layers (0 for those gone from the cache)."""
        total = 0
        for layer in self.layers:
            try:
                total += os.stat(layer).st_blocks * 512
            except OSError:
                continue
        return total

    @property
    def last_used(self) -> float | None:
        """When a sandbox last built from it (``None``: never)."""
        try:
            return (named_root() / f"{self.name}{_USED}").stat().st_mtime
        except OSError:
            return None

    def built(self) -> BuiltImage | None:
        """The built image, if every layer is still in the cache."""
        layers = tuple(Path(p) for p in self.layers)
        if not layers or not all(layer.is_file() for layer in layers):
            return None
        config = ImageConfig.from_json(self.config)
        return BuiltImage(self.key, self.name, layers, config, Path(self.directory))

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"layers": list(self.layers)}


def named_root() -> Path:
    return images_root().parent / "named"


def check_name(name: str) -> str:
    if not NAME.match(name):
        raise ConfigError(
            f"invalid image name {name!r}",
            hint="a name is 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit",
        )
    return name


def lookup(name: str) -> NamedImage | None:
    """The registry entry ``name``, or ``None``."""
    if not NAME.match(name):
        return None
    path = named_root() / f"{name}{_SUFFIX}"
    try:
        data = json.loads(path.read_text())
        return NamedImage(
            name=str(data["name"]),
            kind=str(data["kind"]),
            source=str(data["source"]),
            key=str(data["key"]),
            directory=str(data["directory"]),
            layers=tuple(str(p) for p in data["layers"]),
            config=dict(data["config"]),
            created=float(data["created"]),
        )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring the unreadable image record %s: %s", path, exc)
        return None


def named_images() -> list[NamedImage]:
    root = named_root()
    entries = []
    for path in sorted(root.glob(f"*{_SUFFIX}")) if root.is_dir() else []:
        entry = lookup(path.name.removesuffix(_SUFFIX))
        if entry is not None:
            entries.append(entry)
    return entries


def _record(entry: NamedImage) -> None:
    root = named_root()
    root.mkdir(parents=True, exist_ok=True)
    write_atomic(root / f"{entry.name}{_SUFFIX}", json.dumps(entry.to_json(), indent=1) + "\n")


def register(
    name: str, image: Image, *, kind: str, source: Path, progress: Progress | None = None
) -> NamedImage:
    """Build ``image`` (or find it in the cache) and record it as ``name`` (replacing any entry)."""
    check_name(name)
    if image.name != name:
        image = dataclasses.replace(image, name=name)  # the name is baked into the image
    built = image.build(progress=progress)
    entry = NamedImage(
        name=name,
        kind=kind,
        source=str(source),
        key=built.key,
        directory=str(built.directory),
        layers=tuple(str(p) for p in built.layers),
        config=built.config.to_json(),
        created=time.time(),
    )
    old = lookup(name)
    _record(entry)
    if old is not None and old.directory != entry.directory:
        _discard(old)  # replaced: what only the old image used goes
    return entry


def import_oci(name: str, archive: str | Path, *, progress: Progress | None = None) -> NamedImage:
    """``capsa image import ARCHIVE --name NAME``."""
    source = Path(archive).expanduser().absolute()
    return register(name, Image.from_oci(source, name=name), kind="oci", source=source,
                    progress=progress)  # fmt: skip


def load_recipe_file(path: Path) -> Image:
    """A TOML recipe, through :func:`capsa.recipes.toml.load_recipe`."""

    image = load_recipe(path)
    if not isinstance(image, Image):
        raise ImageError(f"the recipe {path} did not describe an image")
    return image


class _Named(Image):
    """An :class:`Image` resolved from the registry: builds from its recorded layers."""

    def build(self, *, progress: Progress | None = None) -> BuiltImage:
        entry = lookup(self.name)
        if entry is None:
            raise ImageError(f"no image named {self.name!r}", hint=_names_hint())
        built = entry.built()
        if built is None:  # its layers left the cache (capsa image rm): rebuild from its source
            log.info("image %s: layers gone from the cache, rebuilding from %s", self.name,
                     entry.source)  # fmt: skip
            source = Path(entry.source)
            if not source.exists():
                raise ImageError(
                    f"the image {self.name!r} is no longer in the cache and its source "
                    f"{entry.source} is gone",
                    hint=f"import it again: capsa image import ARCHIVE --name {self.name}",
                )
            fresh = load_recipe_file(source) if entry.kind == "recipe" else Image.from_oci(source)
            entry = register(self.name, fresh, kind=entry.kind, source=source, progress=progress)
            built = entry.built()
            if built is None:
                raise ImageError(f"the image {self.name!r} was rebuilt but cannot be read back")
        mark_used(self.name)
        return built


def mark_used(name: str) -> None:
    try:
        (named_root() / f"{name}{_USED}").touch()
    except OSError as exc:
        log.debug("cannot mark the image %s used: %s", name, exc)


def _names_hint() -> str:
    names = [entry.name for entry in named_images()]
    known = (
        f"one of: {', '.join(names)}" if names else "none yet: capsa image import ARCHIVE --name NAME"
    )
    return f"give an image name ({known}), a .toml recipe, or an image archive or directory"


def resolve_image(ref: str) -> Image:
    """What ``--image`` and the pytest marker's ``image=`` take: a registered NAME, a ``.toml``
    recipe, or a ``docker save`` / OCI archive or layout directory. ConfigError otherwise."""
    if NAME.match(ref) and lookup(ref) is not None:
        return _Named.from_oci(Path(ref), name=ref)  # source unused: build() reads the registry
    path = Path(ref).expanduser()
    if path.suffix == ".toml":
        if not path.is_file():
            raise ConfigError(f"recipe not found: {path}", hint=_names_hint())
        return load_recipe_file(path)
    if path.exists():
        return Image.from_oci(path)
    raise ConfigError(f"unknown image {ref!r}: not a name, a recipe nor an archive", hint=_names_hint())


def _templates_of(layers: set[str]) -> list[Path]:
    """The templates recorded from exactly these layers (not those of an image sharing a few)."""
    found = []
    root = cache_dir() / "templates"  # capsa.sandbox.builder.template_root (which imports us)
    for directory in sorted(root.iterdir()) if root.is_dir() else []:
        try:
            meta = json.loads((directory / "snapshot.json").read_text())
            disks = {str(disk[0]) for disk in meta["record"]["disks"]}
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            continue
        if disks and disks == layers:
            found.append(directory)
    return found


def _discard(entry: NamedImage) -> list[Path]:
    """Delete what only ``entry`` uses: its templates and its image directory (when every layer in
    it is the entry's own and no other name uses it)."""
    removed: list[Path] = []
    others = named_images()  # without ``entry``: removed, or replaced under its name
    shared = {layer for other in others for layer in other.layers}
    if not any(set(other.layers) == set(entry.layers) for other in others):
        for template in _templates_of(set(entry.layers)):
            shutil.rmtree(template, ignore_errors=True)
            removed.append(template)
    directory = Path(entry.directory)
    try:
        inside = directory.resolve().is_relative_to(images_root().resolve())
        own = all(str(p) in entry.layers and str(p) not in shared for p in directory.glob("*.sqfs"))
    except OSError:
        return removed
    if inside and own and directory.is_dir() and directory != images_root():
        shutil.rmtree(directory, ignore_errors=True)
        removed.append(directory)
    return removed


def remove(name: str) -> list[Path]:
    """Forget ``name`` and delete its templates and its layers (unless another name uses them);
    returns what was removed. ConfigError if there is no such image."""
    entry = lookup(name)
    if entry is None:
        raise ConfigError(f"no image named {name!r}", hint=_names_hint())
    record = named_root() / f"{name}{_SUFFIX}"
    record.unlink(missing_ok=True)
    (named_root() / f"{name}{_USED}").unlink(missing_ok=True)
    return [record, *_discard(entry)]
