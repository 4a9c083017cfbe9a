"""``Image.apt_install``: resolve and download on the host, ``dpkg -i`` in the build VM.

Measured on 2 cores under TCG, ``apt-get update && apt-get install jq`` inside a build VM took ~100 s,
nearly all of it apt parsing the mirror's package lists at emulated speed. Unpacking on the host
alone (``apt-get download`` + ``dpkg-deb -x``, or mmdebstrap's extract mode) takes seconds but runs
no maintainer scripts and leaves dpkg's database unaware of the packages. So the work is split:

1. On the host, without root: the host's ``apt-get`` with its own state directory under
   ``<cache>/apt/`` (the host's Debian sources, or the step's ``sources`` line), and the *guest's*
   dpkg status (read from the topmost layer that has one, else from capsa's root) so that it
   resolves exactly the packages the image lacks; ``apt-get install --download-only``.
2. In a build VM (no network): the ``.deb`` files are written into the guest and ``dpkg -i``
   installs them (maintainer scripts run, dpkg's database is updated); the change is the layer.

A host without ``apt-get`` falls back to apt inside the build VM on capsa's NAT.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import urllib.parse
from pathlib import Path

from capsa._paths import cache_dir
from capsa.errors import ImageError
from capsa.image.rootfs import host_sources
from capsa.recipes.steps import Step

log = logging.getLogger(__name__)

APT_TIMEOUT = 900.0
DEB_DIR = "/tmp/capsa-debs"
STATUS = "var/lib/dpkg/status"
MAX_STATUS = 256 << 20  # dpkg's status of a big image: a few MiB
INSTALL_COMMAND = (
    f"export DEBIAN_FRONTEND=noninteractive; dpkg -i --force-confdef --force-confold {DEB_DIR}/*.deb; "
    f"rc=$?; rm -rf {DEB_DIR} /var/log/dpkg.log /var/lib/dpkg/*-old /var/cache/debconf/*-old; exit $rc"
)


def host_has_apt() -> bool:
    return shutil.which("apt-get") is not None


def _sources(step: Step) -> tuple[str, str]:
    """(file name, content) of the apt sources to use: the step's own line, or the host's."""
    own = step.option("sources")
    if own:
        return "capsa.list", own.rstrip("\n") + "\n"
    host = host_sources()
    if host is None:
        raise ImageError(
            "apt_install needs the host's Debian apt sources",
            hint="on a non-Debian host pass sources='deb http://deb.debian.org/debian bookworm main'",
        )
    name = "capsa.sources" if host.suffix == ".sources" else "capsa.list"
    return name, host.read_text()


def guest_status(layers: list[Path], rootfs: Path) -> bytes:
    """dpkg's status file as the image so far has it (the topmost layer that has one wins).

    A run() step's guest wrote it (it is root there): at most :data:`MAX_STATUS` bytes are read."""
    tool = shutil.which("rdsquashfs")
    if tool is None:
        raise ImageError("rdsquashfs not found", hint="install squashfs-tools-ng")
    for path, name in [*((layer, f"rootfs/{STATUS}") for layer in reversed(layers)), (rootfs, STATUS)]:
        content = _read_bounded([tool, "-c", name, str(path)], MAX_STATUS, f"dpkg's status in {path}")
        if content:
            return content
    raise ImageError("cannot read dpkg's status from the image: is it Debian-based?")


def _read_bounded(argv: list[str], limit: int, what: str) -> bytes | None:
    """The stdout of ``argv`` (None if it fails), refused past ``limit`` bytes, never held whole."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    watchdog = threading.Timer(120, proc.kill)
    watchdog.start()
    try:
        data = proc.stdout.read(limit + 1)
        if len(data) > limit:
            raise ImageError(
                f"{what} is over {limit} bytes",
                hint="a run() step wrote a huge /var/lib/dpkg/status; raise "
                "capsa.recipes.apt.MAX_STATUS if it is genuine",
            )
        return data if proc.wait(120) == 0 else None
    finally:
        watchdog.cancel()
        proc.kill()
        proc.wait()
        proc.stdout.close()


def _options(state: Path, status: Path, archives: Path) -> list[str]:
    pairs = {
        "Dir::Etc::SourceList": str(state / "sources.list"),
        "Dir::Etc::SourceParts": str(state / "sources.list.d"),
        "Dir::State": str(state / "state"),
        "Dir::State::Lists": str(state / "lists"),
        "Dir::State::status": str(status),
        "Dir::Cache": str(state / "cache"),
        "Dir::Cache::archives": str(archives),
        "Dir::Log": str(archives.parent),
        "Debug::NoLocking": "1",
        "Acquire::Languages": "none",
        "Acquire::Retries": "3",
        "APT::Install-Recommends": "false",
        "APT::Architecture": "amd64",
        "APT::Architectures": "amd64",
    }
    if os.geteuid() == 0:
        pairs["APT::Sandbox::User"] = "root"  # the _apt user cannot read a private cache dir
    argv: list[str] = []
    for key, value in pairs.items():
        argv += ["-o", f"{key}={value}"]
    return argv


def _apt(argv: list[str], what: str) -> str:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", LC_ALL="C")
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=APT_TIMEOUT, env=env,
                              stdin=subprocess.DEVNULL, check=False)  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        raise ImageError(f"{what} took over {APT_TIMEOUT}s") from exc
    output = done.stdout + done.stderr
    if done.returncode != 0 or "\nE: " in "\n" + output:
        raise ImageError(
            f"{what} failed (exit {done.returncode}):\n{output.strip()[-3000:]}",
            hint="check the package names and that the Debian mirror (or the step's sources) "
            "is reachable from this host",
        )
    return output


def _uris(output: str) -> list[str]:
    """The package URIs of ``apt-get install --print-uris`` (lines ``'URI' file size hash``)."""
    found = []
    for line in output.splitlines():
        if line.startswith("'") and line.count("'") >= 2:
            uri = line[1 : line.index("'", 1)]
            if uri.endswith(".deb"):
                found.append(uri)
    return found


def download(step: Step, status: bytes, dest: Path) -> list[Path]:
    """Resolve the step's packages against ``status`` and download the missing ``.deb`` files
    (dependencies included) into ``dest``; returns them (empty when all are installed)."""
    name, content = _sources(step)
    state = cache_dir() / "apt" / hashlib.sha256(content.encode()).hexdigest()[:16]
    for sub in ("sources.list.d", "state", "lists/partial", "cache"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    (state / "sources.list").write_text("")
    (state / "sources.list.d" / name).write_text(content)
    with tempfile.TemporaryDirectory(prefix="capsa-apt-") as tmp:
        status_file = Path(tmp) / "status"
        status_file.write_bytes(status)
        archives = dest
        (archives / "partial").mkdir(parents=True, exist_ok=True)
        options = _options(state, status_file, archives)
        with (state / ".lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one apt-get at a time per state directory
            _apt(["apt-get", *options, "-q", "update"], "apt-get update")
            install = ["apt-get", *options, "-q", "-y", "install", "--", *step.args]
            what = f"apt_install({', '.join(step.args)})"
            uris = _uris(_apt([*install[:-2], "--print-uris", *install[-2:]], what))
            if any(not uri.startswith("file:") for uri in uris):
                _apt([*install[:-2], "--download-only", *install[-2:]], what)
    for uri in uris:  # apt uses file: packages in place instead of downloading them
        if uri.startswith("file:"):
            source = Path(urllib.parse.unquote(uri.removeprefix("file:")))
            shutil.copyfile(source, dest / source.name)
    debs = sorted(dest.glob("*.deb"))
    log.info("apt_install: %d packages to install: %s", len(debs), ", ".join(p.name for p in debs))
    return debs
