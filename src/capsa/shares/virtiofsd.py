"""Run one virtiofsd per virtio-fs share, with read-only enforced on the host.

Debian's QEMU 7.2 ships the C virtiofsd, which has no read-only option. capsa therefore starts it in
a private mount namespace (``unshare``) where the shared directory is bind-mounted onto itself and
remounted read-only before virtiofsd starts: every write the guest asks for fails with EROFS in the
host kernel, whatever the guest does to its own mount. Without root, the namespace is also a user
namespace mapping the caller to root, which is what lets virtiofsd run at all; files the guest
creates then belong to the caller. virtiofsd's own ``sandbox=namespace`` pivots into the shared
directory, so no path — ``..``, absolute or guest-made symlinks — resolves outside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from pathlib import Path

from capsa.backend.qemu.process import QemuProcess
from capsa.errors import CapsaTimeoutError, ShareError
from capsa.shares.spec import ShareSpec

VIRTIOFSD_CANDIDATES = ("/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd", "virtiofsd")
SOCKET_TIMEOUT = 10.0
CACHE_MODE = "auto"  # metadata cached ~1 s: host-side edits show up in the guest, reads stay fast
# writeback: the guest batches writes in its page cache and flushes them on close/fsync; under TCG
# writing 100 MiB took 5.9 s without it and 1.1 s with it (bench/shares.py).

# $1 = shared dir, $2 = "ro" or "rw", then virtiofsd's argv.
_WRAPPER = (
    'dir="$1"; mode="$2"; shift 2; '
    'if [ "$mode" = ro ]; then '
    'mount --bind -- "$dir" "$dir" && mount -o remount,bind,ro -- "$dir" || exit 70; fi; '
    'exec "$@"'
)


def find_virtiofsd() -> str | None:
    for candidate in VIRTIOFSD_CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return found
    return None


def virtiofsd_argv(virtiofsd: str, share: ShareSpec, socket_path: Path) -> list[str]:
    unshare = ["unshare", "--mount", "--propagation", "private"]
    if os.geteuid() != 0:
        unshare[1:1] = ["--user", "--map-root-user"]
    mode = "ro" if share.read_only else "rw"
    daemon = [
        virtiofsd,
        "-f",
        f"--socket-path={socket_path}",
        "-o", f"source={share.host_path}",
        "-o", f"cache={CACHE_MODE}",
        "-o", "sandbox=namespace",
        "-o", "no_posix_lock",
        "-o", "writeback",
        "-o", "log_level=warn",
    ]  # fmt: skip
    return [*unshare, "sh", "-c", _WRAPPER, "capsa-virtiofsd", str(share.host_path), mode, *daemon]


async def start_virtiofsd(
    virtiofsd: str, share: ShareSpec, socket_path: Path, log_path: Path
) -> QemuProcess:
    """Start virtiofsd and wait until its socket exists (QEMU connects to it at start)."""
    if shutil.which("unshare") is None:
        raise ShareError("unshare not found", hint="apt-get install util-linux")
    process = await QemuProcess.start(
        virtiofsd_argv(virtiofsd, share, socket_path), pass_fds=(), log_path=log_path, name="virtiofsd"
    )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SOCKET_TIMEOUT
    while not socket_path.exists():  # noqa: ASYNC240 - one stat in our private runtime dir
        if process.returncode is not None or loop.time() > deadline:
            if process.returncode is None:
                await process.kill_and_wait()
            raise ShareError(
                f"virtiofsd for {share.host_path} did not start (exit {process.returncode})",
                host_path=share.host_path,
                log_tail=process.log_tail(),
                hint="see the log tail; without root, user namespaces must be enabled "
                "(sysctl kernel.unprivileged_userns_clone=1); or share with mechanism='9p'",
            )
        with contextlib.suppress(CapsaTimeoutError):
            await process.wait(0.01)
    return process
