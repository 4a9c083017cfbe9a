"""Image recipes: ``capsa.Image.debian()`` plus steps, one cached read-only layer per step.

A recipe's image is a stack: capsa's own root (the default sandbox rootfs: bookworm, python3, the
agent's dependencies) at the bottom, a small *base* layer naming the image, then one SquashFS layer
per step. The guest's init stacks them with overlayfs under the sandbox's writable tmpfs layer
(:mod:`capsa.image.sandbox`); the agent chroots into the result.

Every layer sits in ``<cache>/images/layers/<key>/`` and is found again by its key, which covers the
step, the content of its inputs (the copied files, a wheel directory) and the key of the layer below:
changing the last step rebuilds only that step. Inside each layer the user's tree is under
``rootfs/``, beside the image config as of that step (``capsa-image.json``), the layer's depth in the
stack and a marker saying that the stack sits on capsa's root.

Steps that need no guest are built on the host without root: ``copy`` and ``pip_install`` stream
their files into ``tar2sqfs``; ``env`` and ``workdir`` only change the config. ``run`` boots the
image built so far and keeps what the command changed (:mod:`capsa.image.recipe_run`);
``apt_install`` resolves and downloads on the host, then ``dpkg -i`` runs in a build VM
(:mod:`capsa.image.recipe_apt`). A build is atomic: a layer's metadata file is written last, so a
layer whose build was interrupted (even by kill -9) is simply built again.

On an imported image (``Image.from_oci(...).copy(...)``) the bottom of the stack is the imported
root (its layer, built by :mod:`capsa.image.custom`, and its config), without capsa's root; only
the host-only steps are allowed there.

:func:`load_recipe` reads the same steps from a TOML file (``capsa image build FILE``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import posixpath
import re
import stat
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from capsa._paths import cache_dir
from capsa.errors import ConfigError, ImageError
from capsa.image import rootfs
from capsa.image.context import inside, open_regular, still_inside
from capsa.image.custom import (
    _META,
    IMAGE_CONFIG_NAME,
    ROOT_PREFIX,
    BuiltImage,
    Image,
    Progress,
    _load,
    _touch,
    build_oci,
    images_root,
)
from capsa.image.layers import squash
from capsa.image.oci import ImageConfig
from capsa.image.sandbox import LAYER_BASE, LAYER_DEPTH

log = logging.getLogger(__name__)

LAYER_VERSION = "1"  # part of every layer key: bump when a step's layer could change
MAX_STEPS = 64
# Each layer with files is a disk of the VM (microvm has 24 virtio-mmio slots, shared with the root
# disk, the agent's port, the network and shares); layers that only change the config (env,
# workdir) are not attached, except the top one, which carries the image's config.
MAX_LAYERS = 16
_CONFIG_ONLY = (None, "env", "workdir")
_LAYER_META = "layer.json"
_LAYER_FILE = "layer.sqfs"
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Directories a layer creates implicitly (the parents of what it adds) keep the base's modes.
_STICKY = {"tmp", "var/tmp"}

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


def _apply_config(config: ImageConfig, step: Step) -> ImageConfig:
    if step.kind == "env":
        key, value = step.args
        env = (*(pair for pair in config.env if pair[0] != key), (key, value))
        return ImageConfig(env, config.workdir, config.user, config.entrypoint, config.cmd)
    if step.kind == "workdir":
        path = posixpath.normpath(posixpath.join(config.workdir or "/", step.args[0]))
        return ImageConfig(config.env, path, config.user, config.entrypoint, config.cmd)
    return config


def guest_path(path: str, config: ImageConfig) -> str:
    """An absolute, normalised guest path (relative ones follow the workdir, as in Docker)."""
    joined = posixpath.normpath(posixpath.join(config.workdir or "/", path))
    return "/" + joined.lstrip("/")


# -- input digests --


_DIGESTS: dict[str, str] = {}  # stat signature of a tree -> its content digest (this process)


def tree_digest(path: Path) -> str:
    """The content of a host file or directory tree: names, types, modes, bytes, link targets.

    Every ``build()`` of an image computes it; the bytes are read again only when a file's size,
    mtime, inode or mode changed since this process last read them."""
    signature = hashlib.sha256(str(path).encode())
    for rel, entry in _walk(path):
        st = entry.lstat()
        signature.update(f"{rel}\0{st.st_mode}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\n".encode())
    cached = _DIGESTS.get(signature.hexdigest())
    if cached is None:
        cached = _DIGESTS[signature.hexdigest()] = _content_digest(path)
    return cached


def _content_digest(path: Path) -> str:
    sha = hashlib.sha256()
    for rel, entry in _walk(path):
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


def _walk(path: Path) -> Iterator[tuple[str, Path]]:
    """``(relative name, path)`` of ``path`` ("" for itself) and everything below it, sorted."""
    yield "", path
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            dirs.sort()
            base = Path(root)
            for name in sorted(dirs + files):
                entry = base / name
                yield entry.relative_to(path).as_posix(), entry


# -- writing a layer's tar --


class LayerTar:
    """Adds entries under ``rootfs/`` to the tar streamed into ``tar2sqfs``, giving every parent
    directory an explicit entry (root-owned, 0755; 1777 for /tmp and /var/tmp) once."""

    def __init__(self, tar: tarfile.TarFile) -> None:
        self.tar = tar
        self.dirs: set[str] = set()
        self._dir("", 0o755)

    def _dir(self, path: str, mode: int) -> None:
        info = tarfile.TarInfo((ROOT_PREFIX + path).rstrip("/"))
        info.type, info.mode, info.mtime = tarfile.DIRTYPE, mode, int(time.time())
        self.tar.addfile(info)
        self.dirs.add(path)

    def parents(self, path: str) -> None:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            folder = "/".join(parts[:i])
            if folder not in self.dirs:
                self._dir(folder, 0o1777 if folder in _STICKY else 0o755)

    def add(self, info: tarfile.TarInfo, data: io.BufferedIOBase | Any = None) -> None:
        """``info.name`` is the guest path without its leading ``/``."""
        path = posixpath.normpath("/" + info.name).strip("/")
        if not path or ".." in info.name.split("/"):
            raise ImageError(f"a layer entry escapes the image root: {info.name!r}")
        self.parents(path)
        if info.isdir():
            if path in self.dirs:
                return
            self.dirs.add(path)
        info.name = ROOT_PREFIX + path
        if info.islnk():
            target = posixpath.normpath("/" + info.linkname).strip("/")
            if not target or ".." in info.linkname.split("/"):
                raise ImageError(f"a hard link escapes the image root: {info.linkname!r}")
            info.linkname = ROOT_PREFIX + target
        info.uname = info.gname = ""
        self.tar.addfile(info, data)


def add_host_tree(layer: LayerTar, src: Path, dst: str) -> int:
    """Docker COPY of ``src`` to the absolute guest path ``dst``; returns the number of entries.
    Symlinks below ``src`` are copied as links, never followed (``src`` itself was resolved inside
    the recipe's context when the step was made)."""
    still_inside(src, "copy()")
    target = dst.strip("/")
    if src.is_dir() and not src.is_symlink():
        base = target
    elif dst.endswith("/"):
        base = f"{target}/{src.name}".strip("/")
    else:
        base = target
    count = 0
    for rel, entry in _walk(src):
        path = f"{base}/{rel}".strip("/") if rel else base
        if not path:
            continue  # the directory's contents go into / itself
        st = entry.lstat()
        info = tarfile.TarInfo(path)
        info.mode, info.uid, info.gid, info.mtime = st.st_mode & 0o7777, 0, 0, int(st.st_mtime)
        if stat.S_ISDIR(st.st_mode):
            info.type = tarfile.DIRTYPE
            layer.add(info)
        elif stat.S_ISLNK(st.st_mode):
            info.type, info.linkname = tarfile.SYMTYPE, os.readlink(entry)
            layer.add(info)
        elif stat.S_ISREG(st.st_mode):
            info.size = st.st_size
            with open_regular(entry, st.st_size) as fh:
                layer.add(info, fh)
        else:
            log.info("copy: skipping %s (not a file, directory or symlink)", entry)
            continue
        count += 1
    return count


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, int(time.time())
    tar.addfile(info, io.BytesIO(data))


# -- the build --


def layers_root() -> Path:
    return cache_dir() / "images" / "layers"


@dataclass(frozen=True)
class Planned:
    """A layer to find or build: its key, its depth in the stack and the config as of it."""

    key: str
    depth: int
    step: Step | None  # None: the base layer
    config: ImageConfig
    inputs: str


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:20]


def plan(image: Image) -> list[Planned]:
    """The layers of ``image`` (bottom first), with their keys; hashes the steps' inputs."""
    from capsa.image.recipe_pip import pip_inputs  # noqa: PLC0415 - it imports this module

    if image.kind == "oci":  # the imported image itself is the bottom layer (host-only steps)
        from capsa.image.custom import oci_base  # noqa: PLC0415

        imported, config = oci_base(image)
        base = _key("oci", LAYER_VERSION, imported)
    else:
        config = ImageConfig()
        base = _key("base", LAYER_VERSION, rootfs.recipe(), image.name)
    planned = [Planned(base, 1, None, config, "")]
    for step in image.steps:
        config = _apply_config(config, step)
        inputs = ""
        if step.kind == "copy":
            inputs = tree_digest(Path(step.args[0]))
        elif step.kind == "pip":
            inputs = pip_inputs(step)
        parent = planned[-1].key
        # A copy is keyed by what it copies, not by where the host keeps it (as in Docker).
        args = step.args[1:] if step.kind == "copy" else step.args
        key = _key(LAYER_VERSION, parent, step.kind, args, step.options, inputs, config.to_json())
        planned.append(Planned(key, len(planned) + 1, step, config, inputs))
    return planned


def _layer_done(directory: Path) -> bool:
    try:
        meta = json.loads((directory / _LAYER_META).read_text())
        return bool(meta.get("key")) and (directory / _LAYER_FILE).is_file()
    except (OSError, ValueError, AttributeError):
        return False


def build_recipe(image: Image, progress: Progress | None = None) -> BuiltImage:
    """Build (or find) every layer of a recipe image; blocking. See the module docstring."""
    from capsa.image.sandbox import sandbox_image  # noqa: PLC0415 - heavy, only when building

    def say(text: str) -> None:
        log.info("image %s: %s", image.name, text)
        if progress is not None:
            progress(text)

    planned = plan(image)
    top = planned[-1]
    key = "r" + top.key
    directory = images_root() / key
    built = _load(directory)
    if built is not None:
        log.debug("image %s: %d steps, all cached", image.name, len(planned) - 1)
        _touch(directory)
        return built
    base_root = sandbox_image(build=True, progress=progress).rootfs  # the bottom of the stack
    imported = image.kind == "oci"  # the base layer is the imported image's root: attached
    attached = [
        item
        for item in planned
        if item is top
        or (item.step is None and imported)
        or (item.step is not None and item.step.kind not in _CONFIG_ONLY)
    ]
    if len(attached) > MAX_LAYERS:
        raise ImageError(
            f"the recipe of {image.name!r} makes {len(attached)} layers with files; at most "
            f"{MAX_LAYERS} fit in a VM",
            hint="merge run() steps (`a && b`), copies into one directory, pip/apt installs",
        )
    paths: list[Path] = []  # the layers with files, then the top one (what a VM attaches)
    last: Path | None = None
    total = len(planned) - 1
    for item in planned:
        label = "base" if item.step is None else f"step {item.depth - 1}/{total}: {item.step.describe()}"
        # A run() step boots the image so far: its layers with files and the latest layer (the
        # config as of the step: env, workdir).
        below = paths if last is None or last in paths else [*paths, last]
        if item.step is None and imported:
            last = build_oci(image, progress).layers[0]
            paths.append(last)
            continue
        last = _find_or_build(image, item, below, label, say, base_root=base_root)
        if item.step is not None and item.step.kind not in _CONFIG_ONLY:
            paths.append(last)
    if last is not None and last not in paths:
        paths.append(last)
    meta: dict[str, Any] = {
        "key": key,
        "name": image.name,
        "kind": "recipe",
        "steps": [[s.kind, *s.args] for s in image.steps],
        "layers": [os.path.relpath(p, directory) for p in paths],
        "config": top.config.to_json(),
    }
    directory.mkdir(parents=True, exist_ok=True)
    partial = directory / f".{_META}.part-{os.getpid()}"
    partial.write_text(json.dumps(meta, indent=1))
    os.replace(partial, directory / _META)
    built = _load(directory)
    if built is None:
        raise ImageError(f"the image built in {directory} cannot be read back")
    return built


def _find_or_build(
    image: Image,
    item: Planned,
    below: list[Path],
    label: str,
    say: Callable[[str], None],
    *,
    base_root: Path,
) -> Path:
    directory = layers_root() / item.key
    if _layer_done(directory):
        say(f"{label} (cached)")
        return directory / _LAYER_FILE
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same layer
        if _layer_done(directory):
            say(f"{label} (cached)")
            return directory / _LAYER_FILE
        say(f"{label}: building")
        started = time.monotonic()
        out = _build_layer(image, item, below, directory, base_root)
        meta = {
            "key": item.key,
            "depth": item.depth,
            "step": None if item.step is None else [item.step.kind, *item.step.args],
            "inputs": item.inputs,
            "built": time.time(),
        }
        partial = directory / f".{_LAYER_META}.part"
        partial.write_text(json.dumps(meta, indent=1))
        os.replace(partial, directory / _LAYER_META)  # last: the layer is now visible
        say(f"{label}: built in {time.monotonic() - started:.1f}s")
        return out


def _in_build_vm(step: Step, below: list[Path], base_root: Path) -> IO[bytes] | None:
    """What a run() or apt_install() step changed, as an open tar file (None: nothing to do)."""
    from capsa.image.recipe_apt import (  # noqa: PLC0415 - boots VMs
        DEB_DIR,
        INSTALL_COMMAND,
        download,
        guest_status,
        host_has_apt,
    )
    from capsa.image.recipe_run import run_in_build_vm  # noqa: PLC0415

    timeout = float(step.option("timeout", "1800"))
    if step.kind == "run":
        return run_in_build_vm(below, step.args[0], timeout=timeout,
                               network=step.option("network") == "1", label=step.describe())  # fmt: skip
    if not host_has_apt():  # resolve and download in the guest, through capsa's NAT
        command = APT_COMMAND.format(packages=" ".join(step.args))
        return run_in_build_vm(below, command, timeout=timeout, network=True, label=step.describe())
    with tempfile.TemporaryDirectory(prefix="capsa-debs-") as tmp:
        debs = download(step, guest_status(below, base_root), Path(tmp))
        if not debs:
            return None  # everything is installed already: an empty layer
        files = {f"{DEB_DIR}/{deb.name}": deb for deb in debs}
        return run_in_build_vm(below, INSTALL_COMMAND, timeout=timeout, network=False,
                               label=step.describe(), files=files)  # fmt: skip


def _build_layer(
    image: Image, item: Planned, below: list[Path], directory: Path, base_root: Path
) -> Path:
    step = item.step
    captured: IO[bytes] | None = None
    if step is not None and step.kind in ("run", "apt"):
        captured = _in_build_vm(step, below, base_root)
    with contextlib.ExitStack() as stack:
        if captured is not None:
            stack.enter_context(captured)
        return _squash_layer(image, item, directory, captured)


def _squash_layer(image: Image, item: Planned, directory: Path, captured: IO[bytes] | None) -> Path:
    step = item.step
    config = item.config.to_json() | {"name": image.name, "key": item.key}

    def write(tar: tarfile.TarFile) -> None:
        layer = LayerTar(tar)
        if step is not None and step.kind == "copy":
            # A copy leaves the config as it was: its destination follows the current workdir.
            add_host_tree(layer, Path(step.args[0]), guest_path(step.args[1], item.config))
        elif step is not None and step.kind == "pip":
            from capsa.image.recipe_pip import add_wheels  # noqa: PLC0415

            add_wheels(layer, step)
        elif captured is not None:
            from capsa.image.capture import add_captured  # noqa: PLC0415

            add_captured(layer, captured)
        _add_bytes(tar, IMAGE_CONFIG_NAME, json.dumps(config).encode())
        _add_bytes(tar, LAYER_DEPTH, f"{item.depth}\n".encode())
        if image.kind == "debian":  # the stack sits on capsa's root; an imported image is its own
            _add_bytes(tar, LAYER_BASE, b"debian\n")

    return squash(write, directory / _LAYER_FILE)


# -- TOML recipes --


def load_recipe(path: Path) -> Image:
    """An image recipe from a TOML file (format in docs/images.md); relative ``copy`` sources
    resolve against the file's directory. ConfigError for a malformed recipe."""
    from capsa.image.recipe_toml import read_recipe  # noqa: PLC0415 - it imports this module

    return read_recipe(Path(path))
