"""``Image.pip_install``: binary wheels for the guest's Python, resolved and unpacked on the host.

``pip download --only-binary=:all:`` runs on the host with the guest's interpreter tags (CPython
3.11, x86_64 manylinux up to bookworm's glibc 2.36), so it resolves dependencies as the guest's pip
would but never builds anything; the wheels are then unpacked straight from their zip into the
layer's tar (``/usr/local/lib/python3.11/dist-packages``, scripts and console entry points in
``/usr/local/bin``), owned by root, without root on the host and without a build VM.
"""

from __future__ import annotations

import configparser
import logging
import os
import posixpath
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

from capsa.errors import ConfigError, ImageError
from capsa.image.recipe import LayerTar, Step, tree_digest
from capsa.image.rootfs import GUEST_PYTHON

log = logging.getLogger(__name__)

PIP_TIMEOUT = 900.0
_MAJOR, _MINOR = GUEST_PYTHON
SITE = f"usr/local/lib/python{_MAJOR}.{_MINOR}/dist-packages"
BIN = "usr/local/bin"
GUEST_GLIBC = 36  # bookworm's glibc 2.36
# pip 23 does not expand manylinux_2_X to older glibc versions itself: list every one.
PLATFORMS = (
    *(f"manylinux_2_{minor}_x86_64" for minor in range(GUEST_GLIBC, 4, -1)),
    "manylinux2014_x86_64",
    "manylinux2010_x86_64",
    "manylinux1_x86_64",
)
_SCHEMES = {"purelib": SITE, "platlib": SITE, "scripts": BIN, "data": "usr/local",
            "headers": f"usr/local/include/python{_MAJOR}.{_MINOR}"}  # fmt: skip


def pip_step(
    requirements: tuple[str, ...], index_url: str | None, find_links: str | Path | None
) -> Step:
    if not requirements:
        raise ConfigError("pip_install() needs at least one requirement")
    for req in requirements:
        if not isinstance(req, str) or not req.strip() or req.lstrip().startswith("-") or "\0" in req:
            raise ConfigError(
                f"pip_install(): invalid requirement {req!r:.60}",
                hint="give requirement specifiers such as 'attrs==23.*'; options go in keywords",
            )
    options: list[tuple[str, str]] = []
    if index_url is not None:
        if not isinstance(index_url, str) or "://" not in index_url:
            raise ConfigError(f"pip_install(): index_url must be a URL, got {index_url!r:.60}")
        options.append(("index_url", index_url))
    if find_links is not None:
        links = str(find_links)
        if "://" not in links:
            folder = Path(links).expanduser().absolute()
            if not folder.is_dir():
                raise ConfigError(f"pip_install(): find_links {folder} is not a directory")
            links = str(folder)
        options.append(("find_links", links))
    return Step("pip", tuple(req.strip() for req in requirements), tuple(options))


def pip_inputs(step: Step) -> str:
    """A local wheel directory's content is part of the layer's key."""
    links = step.option("find_links")
    return tree_digest(Path(links)) if links and "://" not in links else ""


def _download(step: Step, dest: Path) -> None:
    argv = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--dest", str(dest),
            "--python-version", f"{_MAJOR}.{_MINOR}", "--implementation", "cp",
            "--abi", f"cp{_MAJOR}{_MINOR}", "--abi", "abi3", "--abi", "none",
            "--no-input", "--disable-pip-version-check", "--progress-bar", "off"]  # fmt: skip
    for platform in PLATFORMS:
        argv += ["--platform", platform]
    index = step.option("index_url")
    links = step.option("find_links")
    if index:
        argv += ["--index-url", index]
    elif links:
        argv.append("--no-index")  # a wheel directory alone: never reach out to PyPI
    if links:
        argv += ["--find-links", links]
    argv += ["--", *step.args]
    env = dict(os.environ, PIP_NO_INPUT="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    if index or links:
        env = _sources_only_from_step(env)
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=PIP_TIMEOUT, env=env,
                              stdin=subprocess.DEVNULL, check=False)  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        raise ImageError(f"pip download of {' '.join(step.args)} took over {PIP_TIMEOUT}s") from exc
    if done.returncode != 0:
        output = (done.stdout + done.stderr).strip()[-3000:]
        missing = "No matching distribution" in output or "Could not find a version" in output
        raise ImageError(
            f"pip_install({', '.join(step.args)}) failed:\n{output}",
            hint=(
                f"no binary wheel for the guest's Python (CPython {_MAJOR}.{_MINOR}, x86_64 "
                "manylinux, glibc 2.36) matches: pick a version that ships such a wheel, or build "
                "one in a run() step"
                if missing
                else "check the requirement and the index (index_url=, find_links=)"
            ),
        )


# pip settings that add or replace where packages come from: with index_url= or find_links=, a
# step's wheels come from what it names only, whatever the host's pip configuration adds.
_SOURCE_KEYS = {"index-url", "extra-index-url", "find-links", "no-index"}
# Settings of the host's pip configuration that still apply (how to reach an index, not which).
_KEPT_KEYS = {"cert", "client-cert", "proxy", "timeout", "retries", "trusted-host"}


def _env_name(key: str) -> str:
    return "PIP_" + key.upper().replace("-", "_")


def _sources_only_from_step(env: dict[str, str]) -> dict[str, str]:
    """``env`` for a pip that reads no configuration file and no source variable, keeping the
    configuration files' connection settings (certificates, proxy, timeouts) as variables."""
    kept: dict[str, str] = {}
    try:
        listed = subprocess.run(
            [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
            timeout=60, env=env, stdin=subprocess.DEVNULL, check=False,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        listed = ""
    for line in listed.splitlines():  # global.cert='/etc/ssl/certs/ca-certificates.crt'
        name, _, value = line.partition("=")
        key = name.rpartition(".")[2]
        if key in _KEPT_KEYS and len(value) >= 2 and value[0] == value[-1] == "'":
            kept.setdefault(_env_name(key), value[1:-1])
    clean = {k: v for k, v in env.items() if k not in {_env_name(key) for key in _SOURCE_KEYS}}
    return {**kept, **clean, "PIP_CONFIG_FILE": os.devnull}


def add_wheels(layer: LayerTar, step: Step) -> None:
    """Download the step's wheels (with their dependencies) and unpack them into ``layer``."""
    with tempfile.TemporaryDirectory(prefix="capsa-wheels-") as tmp:
        _download(step, Path(tmp))
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise ImageError(f"pip_install({', '.join(step.args)}) downloaded no wheel")
        for wheel in wheels:
            _unpack(layer, wheel)
            log.info("pip_install: unpacked %s", wheel.name)


def _safe(name: str, wheel: Path) -> str:
    parts = name.split("/")
    if name.startswith("/") or ".." in parts or "\\" in name or "\0" in name:
        raise ImageError(f"the wheel {wheel.name} has an entry escaping its root: {name!r}")
    return posixpath.normpath(name)


def _unpack(layer: LayerTar, wheel: Path) -> None:
    try:
        archive = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as exc:
        raise ImageError(f"{wheel.name} is not a readable wheel: {exc}") from exc
    with archive:
        names = [i for i in archive.infolist() if not i.is_dir()]
        dist_info = next(
            (i.filename.split("/")[0] for i in names if i.filename.endswith(".dist-info/WHEEL")), None
        )
        if dist_info is None:
            raise ImageError(f"{wheel.name} has no .dist-info/WHEEL: not a wheel")
        data_dir = dist_info.removesuffix(".dist-info") + ".data"
        now = int(time.time())
        for info in names:
            name = _safe(info.filename, wheel)
            target = f"{SITE}/{name}"
            mode = (info.external_attr >> 16) & 0o777 or 0o644
            content = archive.read(info)
            if name.startswith(data_dir + "/"):
                scheme, _, rest = name[len(data_dir) + 1 :].partition("/")
                if scheme not in _SCHEMES or not rest:
                    raise ImageError(f"{wheel.name}: unknown data scheme in {name!r}")
                target = f"{_SCHEMES[scheme]}/{rest}"
                if scheme == "scripts":
                    mode = 0o755
                    if content.startswith(b"#!python"):
                        content = b"#!/usr/bin/python3" + content[len(b"#!python") :]
            _add(layer, target, content, mode, now)
        entry_points = f"{dist_info}/entry_points.txt"
        if entry_points in archive.namelist():
            _scripts(layer, archive.read(entry_points).decode(errors="replace"), now)


def _add(layer: LayerTar, path: str, content: bytes, mode: int, mtime: int) -> None:
    import io  # noqa: PLC0415

    info = tarfile.TarInfo(path)
    info.size, info.mode, info.mtime = len(content), mode, mtime
    layer.add(info, io.BytesIO(content))


_SCRIPT = """#!/usr/bin/python3
import sys
from {module} import {head}
if __name__ == "__main__":
    sys.exit({call}())
"""


def _scripts(layer: LayerTar, text: str, mtime: int) -> None:
    """``console_scripts`` / ``gui_scripts`` entry points as ``/usr/local/bin`` launchers."""
    parser = configparser.ConfigParser(interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    try:
        parser.read_string(text)
    except configparser.Error as exc:
        log.warning("ignoring malformed entry_points.txt: %s", exc)
        return
    for section in ("console_scripts", "gui_scripts"):
        if not parser.has_section(section):
            continue
        for name, spec in parser.items(section):
            module, _, attr = spec.partition(":")
            attr = attr.split("[")[0].strip()
            module = module.strip()
            if not name or "/" in name or not module or not attr:
                continue
            head = attr.split(".")[0]
            script = _SCRIPT.format(module=module, head=head, call=attr)
            _add(layer, f"{BIN}/{name}", script.encode(), 0o755, mtime)
