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
image built so far and keeps what the command changed (:mod:`capsa.recipes.run`);
``apt_install`` resolves and downloads on the host, then ``dpkg -i`` runs in a build VM
(:mod:`capsa.recipes.apt`). A build is atomic: a layer's metadata file is written last, so a
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
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from capsa._paths import cache_dir, write_atomic
from capsa.errors import ImageError
from capsa.image import rootfs
from capsa.image.custom import (
    IMAGE_CONFIG_NAME,
    BuiltImage,
    Progress,
    build_oci,
    images_root,
    load_built,
    oci_base,
    publish_built,
    touch_used,
)
from capsa.image.layers import squash
from capsa.image.oci import ImageConfig
from capsa.image.sandbox import LAYER_BASE, LAYER_DEPTH, sandbox_image
from capsa.recipes.apt import DEB_DIR, INSTALL_COMMAND, download, guest_status, host_has_apt
from capsa.recipes.capture import add_captured
from capsa.recipes.layertar import LayerTar, add_host_tree
from capsa.recipes.pip import add_wheels, pip_inputs
from capsa.recipes.run import run_in_build_vm
from capsa.recipes.steps import APT_COMMAND, Recipe, Step, apply_config, in_workdir, tree_digest

log = logging.getLogger(__name__)

LAYER_VERSION = "1"  # part of every layer key: bump when a step's layer could change
# Each layer with files is a disk of the VM (microvm has 24 virtio-mmio slots, shared with the root
# disk, the agent's port, the network and shares); layers that only change the config (env,
# workdir) are not attached, except the top one, which carries the image's config.
MAX_LAYERS = 16
_CONFIG_ONLY = (None, "env", "workdir")
_LAYER_META = "layer.json"
_LAYER_FILE = "layer.sqfs"


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


def plan(image: Recipe) -> list[Planned]:
    """The layers of ``image`` (bottom first), with their keys; hashes the steps' inputs."""

    if image.kind == "oci":  # the imported image itself is the bottom layer (host-only steps)
        imported, config = oci_base(image.source, image.name)
        base = _key("oci", LAYER_VERSION, imported)
    else:
        config = ImageConfig()
        base = _key("base", LAYER_VERSION, rootfs.recipe(), image.name)
    planned = [Planned(base, 1, None, config, "")]
    for step in image.steps:
        config = apply_config(config, step)
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


def build_recipe(image: Recipe, progress: Progress | None = None) -> BuiltImage:
    """Build (or find) every layer of a recipe image; blocking. See the module docstring."""

    def say(text: str) -> None:
        log.info("image %s: %s", image.name, text)
        if progress is not None:
            progress(text)

    planned = plan(image)
    top = planned[-1]
    key = "r" + top.key
    directory = images_root() / key
    built = load_built(directory)
    if built is not None:
        log.debug("image %s: %d steps, all cached", image.name, len(planned) - 1)
        touch_used(directory)
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
            last = build_oci(image.source, image.name, progress).layers[0]
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
    return publish_built(directory, meta)


def _find_or_build(
    image: Recipe,
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
        write_atomic(directory / _LAYER_META, json.dumps(meta, indent=1))  # last: the layer is visible
        say(f"{label}: built in {time.monotonic() - started:.1f}s")
        return out


def _in_build_vm(step: Step, below: list[Path], base_root: Path) -> IO[bytes] | None:
    """What a run() or apt_install() step changed, as an open tar file (None: nothing to do)."""

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
    image: Recipe, item: Planned, below: list[Path], directory: Path, base_root: Path
) -> Path:
    step = item.step
    captured: IO[bytes] | None = None
    if step is not None and step.kind in ("run", "apt"):
        captured = _in_build_vm(step, below, base_root)
    with contextlib.ExitStack() as stack:
        if captured is not None:
            stack.enter_context(captured)
        return _squash_layer(image, item, directory, captured)


def _squash_layer(image: Recipe, item: Planned, directory: Path, captured: IO[bytes] | None) -> Path:
    step = item.step
    config = item.config.to_json() | {"name": image.name, "key": item.key}

    def write(tar: tarfile.TarFile) -> None:
        layer = LayerTar(tar)
        if step is not None and step.kind == "copy":
            # A copy leaves the config as it was: its destination follows the current workdir.
            add_host_tree(layer, Path(step.args[0]), in_workdir(step.args[1], item.config))
        elif step is not None and step.kind == "pip":
            add_wheels(layer, step)
        elif captured is not None:
            add_captured(layer, captured)
        _add_bytes(tar, IMAGE_CONFIG_NAME, json.dumps(config).encode())
        _add_bytes(tar, LAYER_DEPTH, f"{item.depth}\n".encode())
        if image.kind == "debian":  # the stack sits on capsa's root; an imported image is its own
            _add_bytes(tar, LAYER_BASE, b"debian\n")

    return squash(write, directory / _LAYER_FILE)
