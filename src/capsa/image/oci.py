"""Read container images: ``docker save`` / ``podman save`` archives and OCI image layouts.

Three forms are accepted: a Docker archive (a tar with ``manifest.json``), an OCI image layout
directory (``oci-layout`` + ``index.json`` + ``blobs/``), or that layout packed in a tar. Nothing is
unpacked onto the host: blobs are read in place (an archive is indexed by capsa's own tar header
decoder), and every name a manifest gives is checked to stay inside the archive before it is opened.
Every field of the JSON documents is type-checked: a malformed one raises :class:`ImageError`.

Every blob is checked against its digest while it is read: OCI blobs against their content address,
Docker layers against the config's ``rootfs.diff_ids`` (digests of the uncompressed layer tars).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any, Literal

from capsa.errors import ImageError
from capsa.image import tarheader

MAX_JSON_BYTES = 16 << 20
MAX_ARCHIVE_MEMBERS = 100_000  # entries of the outer archive (a layout's blobs, a save's layers)
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


class _Slice(io.RawIOBase):
    """One member's data inside the archive file: a seekable reader of its bytes only."""

    def __init__(self, path: Path, offset: int, size: int) -> None:
        super().__init__()
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._offset, self._size, self._pos = offset, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        want = min(len(view), self._size - self._pos)
        if want <= 0:
            return 0
        got = os.preadv(self._fd, [view[:want]], self._offset + self._pos)
        if not got:
            raise OSError(f"the archive ends inside a member ({self._size} bytes at {self._offset})")
        self._pos += got
        return got

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


def _index(path: Path) -> dict[str, tuple[int, int]]:
    """The regular files of a plain tar: name -> (data offset, size), read header by header with
    seeks over the data. capsa's own header decoder (:mod:`capsa.image.tarheader`) and not
    :mod:`tarfile`, whose PAX parser is quadratic on Python before 3.11.10 (CVE-2024-6232)."""
    members: dict[str, tuple[int, int]] = {}
    with path.open("rb") as fh:
        end = os.fstat(fh.fileno()).st_size

        def block() -> bytes | None:
            data = fh.read(tarheader.BLOCK)
            if len(data) not in (0, tarheader.BLOCK):
                raise tarheader.TarError("the archive ends inside a header")
            return data or None

        def meta(size: int) -> bytes:
            data = fh.read(size + (-size % tarheader.BLOCK))
            if len(data) < size:
                raise tarheader.TarError("the archive ends inside an extended header")
            return data[:size]

        count = 0
        while True:
            member = tarheader.next_member(block, meta)
            if member is None:
                return members
            count += 1
            if count > MAX_ARCHIVE_MEMBERS:
                raise tarheader.TarError(f"over {MAX_ARCHIVE_MEMBERS} entries: not an image")
            offset, skip = fh.tell(), tarheader.data_size(member)
            if offset + skip > end:
                raise tarheader.TarError(f"the archive ends inside {member.name!r}")
            fh.seek(skip, io.SEEK_CUR)
            try:
                name = _clean_name(member.name, "the archive")
            except ImageError:
                continue  # never looked up: a manifest naming it is refused the same way
            if member.isreg():
                members[name] = (offset, member.size)


class Archive:
    """Read-only access to the files of an image archive (a tar) or layout (a directory)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._members: dict[str, tuple[int, int]] | None = None
        if path.is_dir():
            return
        try:
            self._members = _index(path)
        except (OSError, tarheader.TarError) as exc:
            raise ImageError(
                f"cannot read the image archive {path}: {exc}",
                hint="give a `docker save` / `podman save` tar, an OCI layout directory or its tar",
            ) from exc

    def close(self) -> None:
        """Nothing stays open between :meth:`open` calls (kept for the context manager)."""

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def has(self, name: str) -> bool:
        name = _clean_name(name, "the image")
        if self._members is None:
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
        if self._members is None:
            try:
                return self._dir_path(clean).open("rb")
            except OSError as exc:
                raise ImageError(
                    f"the image {self.path} has no readable {name!r}: {exc}",
                    hint="the layout is incomplete or not an image",
                ) from exc
        member = self._members.get(clean)
        if member is None:
            raise ImageError(
                f"the image {self.path} has no file {name!r}",
                hint="the archive is incomplete or not an image",
            )
        try:
            return io.BufferedReader(_Slice(self.path, *member), 1 << 16)
        except OSError as exc:
            raise ImageError(f"cannot read the image archive {self.path}: {exc}") from exc

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


_MALFORMED = "the image is malformed: re-export it (`docker save`, `skopeo copy ... oci:DIR`)"


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ImageError(f"{what} is not a JSON object", hint=_MALFORMED)
    return value


def _list(value: Any, what: str, *, optional: bool = False) -> list[Any]:
    if value is None and optional:
        return []
    if not isinstance(value, list):
        raise ImageError(f"{what} is not a JSON list", hint=_MALFORMED)
    return value


def _strings(value: Any, what: str) -> tuple[str, ...]:
    """A list of strings (or null: none), as Docker's config fields ``Cmd``, ``Entrypoint``..."""
    items = _list(value, what, optional=True)
    if not all(isinstance(item, str) for item in items):
        raise ImageError(f"{what} is not a list of strings", hint=_MALFORMED)
    return tuple(items)


def _string(value: Any, what: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ImageError(f"{what} is not a string", hint=_MALFORMED)
    return value or None


def _config(data: Any) -> ImageConfig:
    inner = _object(_object(data, "the image config").get("config") or {}, "the config's 'config'")
    env: list[tuple[str, str]] = []
    for item in _strings(inner.get("Env"), "the config's Env"):
        if "=" in item:
            key, _, value = item.partition("=")
            env.append((key, value))
    return ImageConfig(
        env=tuple(env),
        workdir=_string(inner.get("WorkingDir"), "the config's WorkingDir"),
        user=_string(inner.get("User"), "the config's User"),
        entrypoint=_strings(inner.get("Entrypoint"), "the config's Entrypoint"),
        cmd=_strings(inner.get("Cmd"), "the config's Cmd"),
    )


def _docker(archive: Archive) -> ImageManifest:
    entries = _list(archive.read_json("manifest.json"), "manifest.json")
    if not entries:
        raise ImageError(f"manifest.json in {archive.path} lists no image", hint=_MALFORMED)
    entry = _object(entries[0], "the image in manifest.json")
    config_name = entry.get("Config")
    if not isinstance(config_name, str):
        raise ImageError(f"manifest.json in {archive.path} lacks Config", hint=_MALFORMED)
    layer_names = _strings(entry.get("Layers"), "the Layers of manifest.json")
    with archive.open(config_name) as fh:
        raw = fh.read(MAX_JSON_BYTES + 1)
    if len(raw) > MAX_JSON_BYTES:
        raise ImageError(f"the image config {config_name!r} is too large", hint=_MALFORMED)
    try:
        config = json.loads(raw)
    except ValueError as exc:
        raise ImageError(f"the image config {config_name!r} is not JSON: {exc}") from exc
    rootfs = _object(_object(config, "the image config").get("rootfs"), "the config's rootfs")
    diff_ids = _list(rootfs.get("diff_ids"), "the config's rootfs.diff_ids")
    if len(diff_ids) != len(layer_names):
        raise ImageError(
            f"the image config lists {len(diff_ids)} layer digests for {len(layer_names)} layers",
            hint=_MALFORMED,
        )
    layers = []
    for name, digest in zip(layer_names, diff_ids, strict=True):
        _blob(digest, f"layer {name!r}")
        layers.append(Layer(_clean_name(name, "manifest.json"), digest, "uncompressed"))
    tags = _strings(entry.get("RepoTags"), "the RepoTags of manifest.json")
    digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    return ImageManifest("docker", tuple(layers), _config(config), digest, tags)


def _descriptor(value: Any, what: str) -> tuple[str, str]:
    """An OCI descriptor's digest and the name of its blob."""
    digest = _object(value, what).get("digest")
    name = _blob(digest, what)
    return str(digest), name


def _pick(manifests: Any) -> dict[str, Any]:
    items = [_object(m, "a manifest entry of the image index") for m in _list(manifests, "the index")]
    if not items:
        raise ImageError("the image index lists no manifest", hint=_MALFORMED)
    for item in items:
        platform = item.get("platform")
        if isinstance(platform, dict) and platform.get("architecture") == "amd64":
            return item
    return items[0]


def _oci(archive: Archive) -> ImageManifest:
    index = _object(archive.read_json("index.json"), "index.json")
    descriptor = _pick(index.get("manifests"))
    for _ in range(4):  # nested indexes (multi-platform images)
        digest, name = _descriptor(descriptor, "the image index")
        manifest = _object(archive.read_json(name, digest), "the image manifest")
        if manifest.get("mediaType") in _INDEX_TYPES or "manifests" in manifest:
            descriptor = _pick(manifest.get("manifests"))
            continue
        break
    else:
        raise ImageError("the image index nests too deeply", hint=_MALFORMED)
    config_digest, config_name = _descriptor(manifest.get("config"), "the manifest's config")
    config = archive.read_json(config_name, config_digest)
    layers = []
    for item in _list(manifest.get("layers"), "the manifest's layers", optional=True):
        layer_digest, layer_name = _descriptor(item, "a layer of the manifest")
        layers.append(Layer(layer_name, layer_digest, "raw"))
    return ImageManifest("oci", tuple(layers), _config(config), digest)


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
