"""Build the sandbox's read-only root filesystem from Debian packages.

``mmdebstrap`` (Debian's successor to debootstrap: faster, and it runs unprivileged in a user namespace
when not root) writes a minbase tarball to a pipe; ``tar2sqfs`` (squashfs-tools-ng) turns the stream
into a SquashFS image without unpacking it, so file ownership stays right without root. LZ4 because
under TCG the guest decompresses at emulated speed: it is several times cheaper to read than xz/zstd.
The host's own apt sources are used, so the image comes from the mirror the host already trusts.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from capsa.errors import ImageError

log = logging.getLogger(__name__)

SUITE = "bookworm"
# python3-pip: installing packages is what most sandboxed code does first; iproute2: `ip` for users
# inspecting the sandbox's network; sudo and python-is-python3 (`python`): what code written for
# E2B's sandboxes expects of the account `user` it runs as (``sudo`` without a password, `python`);
# libnss-myhostname resolves the guest's own hostname (which a fork or restore changes) without an
# /etc/hosts entry or a DNS query, else sudo warns "unable to resolve host" on every call.
PACKAGES = (
    "python3",
    "python3-msgpack",
    "python3-pip",
    "iproute2",
    "sudo",
    "python-is-python3",
    "libnss-myhostname",
)
# The unprivileged account E2B's sandboxes run commands as (``capsa serve``'s default user): uid and
# gid 1000, home /home/user, and root through ``sudo`` without a password, as in E2B's base image.
ACCOUNT = "user"
ACCOUNT_ID = 1000
_ACCOUNT_HOOKS = (
    f'chroot "$1" useradd --create-home --uid {ACCOUNT_ID} --user-group --shell /bin/bash {ACCOUNT}',
    f'echo "{ACCOUNT} ALL=(ALL:ALL) NOPASSWD: ALL" > "$1/etc/sudoers.d/{ACCOUNT}"',
    f'chmod 0440 "$1/etc/sudoers.d/{ACCOUNT}"',
)
GUEST_PYTHON = (3, 11)  # bookworm's python3: the agent's bytecode is precompiled for it
# Documentation, man pages and translations are never used in a sandbox and cost ~30% of the image.
_DPKG_EXCLUDES = (
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
)
BUILD_TIMEOUT = 1200.0
_SOURCES = (Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list"))

Progress = Callable[[str], None]


def recipe() -> str:
    """Everything that determines the rootfs contents; its hash keys the cache."""
    return "|".join([SUITE, *PACKAGES, *_DPKG_EXCLUDES, *_ACCOUNT_HOOKS, "lz4", "131072"])


def _host_is_debian() -> bool:
    try:
        return "\nID=debian\n" in "\n" + Path("/etc/os-release").read_text()
    except OSError:
        return False


def host_sources() -> Path | None:
    """The host's apt sources when the host is Debian; elsewhere mmdebstrap's default Debian mirror."""
    if not _host_is_debian():
        return None
    for path in _SOURCES:
        if path.is_file() and path.stat().st_size > 0:
            return path
    return None


def _require(tool: str, package: str) -> str:
    found = shutil.which(tool)
    if found is None:
        raise ImageError(
            f"{tool} not found", hint=f"install it: apt-get install {package} (scripts/setup.sh does)"
        )
    return found


def build_rootfs(out: Path, progress: Progress | None = None) -> Path:
    """Build the SquashFS root filesystem at ``out`` (atomically: a partial build never appears)."""
    mmdebstrap = _require("mmdebstrap", "mmdebstrap")
    tar2sqfs = _require("tar2sqfs", "squashfs-tools-ng")
    mode = "root" if os.geteuid() == 0 else "unshare"
    argv = [
        mmdebstrap,
        f"--mode={mode}",
        "--variant=minbase",
        f"--include={','.join(PACKAGES)}",
        "--format=tar",
        "--skip=cleanup/reproducible",
        *(f"--dpkgopt={opt}" for opt in _DPKG_EXCLUDES),
        *(f"--customize-hook={hook}" for hook in _ACCOUNT_HOOKS),
        SUITE,
        "-",
    ]
    sources = host_sources()
    if sources is not None:
        argv.append(str(sources))
    partial = out.with_name(out.name + ".part")
    log_path = out.with_name(out.name + ".build.log")
    squash = [tar2sqfs, "--quiet", "--no-skip", "--force", "--exportable", "--compressor", "lz4",
              "--block-size", "131072", str(partial)]  # fmt: skip
    if progress:
        progress(f"debootstrapping Debian {SUITE} + {', '.join(PACKAGES)} (about a minute)")
    log.info("building rootfs: %s | %s", " ".join(argv), " ".join(squash))
    with log_path.open("wb") as build_log:
        producer = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=build_log)
        assert producer.stdout is not None
        try:
            consumer = subprocess.run(
                squash, stdin=producer.stdout, stderr=build_log, timeout=BUILD_TIMEOUT, check=False
            )
            producer.stdout.close()
            producer_rc = producer.wait(timeout=60)
        except subprocess.TimeoutExpired:
            producer.kill()
            producer.wait()
            partial.unlink(missing_ok=True)
            raise ImageError(
                f"rootfs build timed out after {BUILD_TIMEOUT:.0f}s; log: {log_path}"
            ) from None
    if producer_rc != 0 or consumer.returncode != 0:
        partial.unlink(missing_ok=True)
        raise ImageError(
            f"rootfs build failed (mmdebstrap exit {producer_rc}, tar2sqfs exit {consumer.returncode})",
            hint=f"see the build log: {log_path}",
        )
    partial.replace(out)
    return out
