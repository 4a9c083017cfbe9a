"""Read container images: ``docker save`` / ``podman save`` archives and OCI image layouts.

Three forms are accepted: a Docker archive (a tar with ``manifest.json``), an OCI image layout
directory (``oci-layout`` + ``index.json`` + ``blobs/``), or that layout packed in a tar. Nothing is
unpacked onto the host: blobs are read in place (through :mod:`tarfile` for archives), and every name
a manifest gives is checked to stay inside the archive before it is opened.

Every blob is checked against its digest while it is read: OCI blobs against their content address,
Docker layers against the config's ``rootfs.diff_ids`` (digests of the uncompressed layer tars).
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any, Literal

from capsa.errors import ImageError

MAX_JSON_BYTES = 16 << 20
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_INDEX_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)

Verify = Literal["raw", "uncompressed"]  # what a layer's digest covers: the blob, or its tar


@dataclass(frozen=True)
class Layer:
    """One layer tar of an image, by its name inside the archive."""

    name: str
    digest: str  # "sha256:<hex>"
    verify: Verify


@dataclass(frozen=True)
class ImageConfig:
    """The parts of an image's config that become exec defaults in the guest."""

    env: tuple[tuple[str, str], ...] = ()
    workdir: str | None = None
    user: str | None = None
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "env": [list(pair) for pair in self.env],
            "workdir": self.workdir,
            "user": self.user,
            "entrypoint": list(self.entrypoint),
            "cmd": list(self.cmd),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ImageConfig:
        return cls(
            env=tuple((str(k), str(v)) for k, v in data.get("env", [])),
            workdir=data.get("workdir"),
            user=data.get("user"),
            entrypoint=tuple(data.get("entrypoint", [])),
            cmd=tuple(data.get("cmd", [])),
        )


@dataclass(frozen=True)
class ImageManifest:
    """What an archive holds: its layers (bottom first), its config and a content key."""

    format: Literal["docker", "oci"]
    layers: tuple[Layer, ...]
    config: ImageConfig
    digest: str  # identifies the content: the OCI manifest's digest, or the Docker config's
    tags: tuple[str, ...] = field(default=())


def _clean_name(name: str, what: str) -> str:
    """A relative path inside the archive; ``..`` and absolute names are refused."""
    parts = [p for p in PurePosixPath(name).parts if p != "."]
    if not parts or name.startswith("/") or ".." in parts:
        raise ImageError(f"{what} names a path outside the archive: {name!r}")
    return "/".join(parts)


class Archive:
    """Read-only access to the files of an image archive (a tar) or layout (a directory)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tar: tarfile.TarFile | None = None
        self._members: dict[str, tarfile.TarInfo] = {}
        if path.is_dir():
            return
        try:
            self._tar = tarfile.open(path, "r:")  # noqa: SIM115 - closed by close()
        except (OSError, tarfile.TarError) as exc:
            raise ImageError(
                f"cannot read the image archive {path}: {exc}",
                hint="give a `docker save` / `podman save` tar, an OCI layout directory or its tar",
            ) from exc
        try:
            for member in self._tar.getmembers():
                try:
                    name = _clean_name(member.name, "the archive")
                except ImageError:
                    continue  # never looked up: a manifest naming it is refused the same way
                if member.isfile():
                    self._members[name] = member
        except (OSError, tarfile.TarError) as exc:
            self.close()
            raise ImageError(f"the image archive {path} is not a readable tar: {exc}") from exc

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def has(self, name: str) -> bool:
        name = _clean_name(name, "the image")
        if self._tar is None:
            return self._dir_path(name).is_file()
        return name in self._members

    def _dir_path(self, name: str) -> Path:
        root = self.path.resolve()
        target = (root / name).resolve()
        if not target.is_relative_to(root):
            raise ImageError(f"{name!r} leads outside the image directory {self.path}")
        return target

    def open(self, name: str) -> IO[bytes]:
        """A seekable reader of file ``name``; ImageError if the image lacks it."""
        clean = _clean_name(name, "the image")
        if self._tar is None:
            try:
                return self._dir_path(clean).open("rb")
            except OSError as exc:
                raise ImageError(f"the image {self.path} has no readable {name!r}: {exc}") from exc
        member = self._members.get(clean)
        reader = self._tar.extractfile(member) if member is not None else None
        if reader is None:
            raise ImageError(
                f"the image {self.path} has no file {name!r}",
                hint="the archive is incomplete or not an image",
            )
        return reader

    def read_json(self, name: str, digest: str | None = None) -> Any:
        with self.open(name) as fh:
            data = fh.read(MAX_JSON_BYTES + 1)
        if len(data) > MAX_JSON_BYTES:
            raise ImageError(f"{name!r} in {self.path} is too large for an image's JSON")
        if digest is not None and "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise ImageError(f"{name!r} in {self.path} does not match its digest {digest}")
        try:
            return json.loads(data)
        except ValueError as exc:
            raise ImageError(f"{name!r} in {self.path} is not valid JSON: {exc}") from exc


def _blob(digest: Any, what: str) -> str:
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise ImageError(f"{what} has an unsupported or malformed digest: {digest!r}")
    return "blobs/sha256/" + digest.removeprefix("sha256:")


def _config(data: Any) -> ImageConfig:
    if not isinstance(data, dict):
        raise ImageError("the image config is not a JSON object")
    inner = data.get("config") or {}
    if not isinstance(inner, dict):
        raise ImageError("the image config's 'config' is not a JSON object")
    env: list[tuple[str, str]] = []
    for item in inner.get("Env") or []:
        if isinstance(item, str) and "=" in item:
            key, _, value = item.partition("=")
            env.append((key, value))

    def strings(value: Any) -> tuple[str, ...]:
        return tuple(str(v) for v in value) if isinstance(value, list) else ()

    return ImageConfig(
        env=tuple(env),
        workdir=inner.get("WorkingDir") or None,
        user=inner.get("User") or None,
        entrypoint=strings(inner.get("Entrypoint")),
        cmd=strings(inner.get("Cmd")),
    )


def _docker(archive: Archive) -> ImageManifest:
    entries = archive.read_json("manifest.json")
    if not isinstance(entries, list) or not entries or not isinstance(entries[0], dict):
        raise ImageError(f"manifest.json in {archive.path} lists no image")
    entry = entries[0]
    config_name = entry.get("Config")
    layer_names = entry.get("Layers")
    if not isinstance(config_name, str) or not isinstance(layer_names, list):
        raise ImageError(f"manifest.json in {archive.path} lacks Config or Layers")
    with archive.open(config_name) as fh:
        raw = fh.read(MAX_JSON_BYTES + 1)
    try:
        config = json.loads(raw)
        diff_ids = config["rootfs"]["diff_ids"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ImageError(f"the image config {config_name!r} has no rootfs.diff_ids") from exc
    if not isinstance(diff_ids, list) or len(diff_ids) != len(layer_names):
        raise ImageError(
            f"the image config lists {len(diff_ids)} layer digests for {len(layer_names)} layers"
        )
    layers = []
    for name, digest in zip(layer_names, diff_ids, strict=True):
        _blob(digest, f"layer {name!r}")
        layers.append(Layer(_clean_name(str(name), "manifest.json"), digest, "uncompressed"))
    tags = tuple(str(t) for t in entry.get("RepoTags") or [])
    digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    return ImageManifest("docker", tuple(layers), _config(config), digest, tags)


def _pick(manifests: Any) -> dict[str, Any]:
    if not isinstance(manifests, list) or not manifests:
        raise ImageError("the image index lists no manifest")
    for item in manifests:
        platform = item.get("platform") if isinstance(item, dict) else None
        if isinstance(platform, dict) and platform.get("architecture") == "amd64":
            picked: dict[str, Any] = item
            return picked
    first = manifests[0]
    if not isinstance(first, dict):
        raise ImageError("the image index has a malformed manifest entry")
    return first


def _oci(archive: Archive) -> ImageManifest:
    descriptor = _pick(archive.read_json("index.json").get("manifests"))
    for _ in range(4):  # nested indexes (multi-platform images)
        name = _blob(descriptor.get("digest"), "the image index")
        manifest = archive.read_json(name, descriptor["digest"])
        if not isinstance(manifest, dict):
            raise ImageError("the image manifest is not a JSON object")
        if manifest.get("mediaType") in _INDEX_TYPES or "manifests" in manifest:
            descriptor = _pick(manifest.get("manifests"))
            continue
        break
    else:
        raise ImageError("the image index nests too deeply")
    config_desc = manifest.get("config") or {}
    config = archive.read_json(_blob(config_desc.get("digest"), "the config"), config_desc["digest"])
    layers = []
    for item in manifest.get("layers") or []:
        if not isinstance(item, dict):
            raise ImageError("the image manifest has a malformed layer entry")
        layers.append(Layer(_blob(item.get("digest"), "a layer"), item["digest"], "raw"))
    return ImageManifest("oci", tuple(layers), _config(config), descriptor["digest"])


def open_image(path: str | Path) -> tuple[Archive, ImageManifest]:
    """Open an image archive or layout and read its manifest (the caller closes the archive)."""
    location = Path(path).expanduser()
    if not location.exists():
        raise ImageError(f"image not found: {location}")
    archive = Archive(location)
    try:
        if archive.has("manifest.json"):
            return archive, _docker(archive)
        if archive.has("index.json"):
            return archive, _oci(archive)
        raise ImageError(
            f"{location} is not a container image (no manifest.json nor index.json)",
            hint="give a `docker save` / `podman save` tar, an OCI layout directory or its tar",
        )
    except BaseException:
        archive.close()
        raise
