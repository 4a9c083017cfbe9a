"""Run one virtiofsd per virtio-fs share, with read-only enforced on the host.

Debian's QEMU 7.2 ships the C virtiofsd, which has no read-only option. capsa therefore starts it in
a private mount namespace (``unshare``) where the shared directory is bind-mounted onto itself and
remounted read-only before virtiofsd starts: every write the guest asks for fails with EROFS in the
host kernel, whatever the guest does to its own mount. Without root, the namespace is also a user
namespace mapping the caller to root, which is what lets virtiofsd run at all; files the guest
creates then belong to the caller. virtiofsd's own ``sandbox=namespace`` pivots into the shared
directory, so no path — ``..``, absolute or guest-made symlinks — resolves outside it.

Guest root must not leave anything on the host that gives privileges there: virtiofsd runs without
xattr support (no ``security.capability``, ACL or label is ever written), without CAP_MKNOD and
CAP_SETFCAP (``modcaps``: the kernel refuses device nodes), and under capsa's seccomp filter
(:mod:`capsa.shares.confine`), which refuses set-uid/set-gid modes — as root and without root alike.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
from pathlib import Path

from capsa.backend.qemu.process import QemuProcess
from capsa.errors import CapsaTimeoutError, ShareError
from capsa.shares.confine import seccomp_preexec
from capsa.shares.spec import ShareSpec

VIRTIOFSD_CANDIDATES = ("/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd", "virtiofsd")
# An early exit (bad source, no user namespaces) is reported with virtiofsd's log; later deaths are
# caught by the VM (VM._watch_daemon) or make QEMU's connect fail.
STARTUP_GRACE = 0.03  # about what virtiofsd took to create its own socket (--socket-path)
CACHE_MODE = "auto"  # metadata cached ~1 s: host-side edits show up in the guest, reads stay fast
# writeback: the guest batches writes in its page cache and flushes them on close/fsync; under TCG
# writing 100 MiB took 5.9 s without it and 1.1 s with it (bench/shares.py).

# $1 = shared dir, $2 = "ro" or "rw", $3 = the socket's path (in virtiofsd's environment, so leak
# checks can tell whose daemon it is: its command line names only ``--fd``), then virtiofsd's argv.
_WRAPPER = (
    'dir="$1"; mode="$2"; CAPSA_VIRTIOFSD_SOCKET="$3"; export CAPSA_VIRTIOFSD_SOCKET; shift 3; '
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


def fuse_escape(value: str) -> str:
    """virtiofsd's ``-o`` parser (libfuse's fuse_opt) splits on commas and unescapes backslashes:
    ``\\,`` is a literal comma, ``\\\\`` a literal backslash."""
    return value.replace("\\", "\\\\").replace(",", "\\,")


def virtiofsd_argv(
    virtiofsd: str, share: ShareSpec, listen_fd: int, socket_path: Path | None = None
) -> list[str]:
    """With ``--fd`` (a socket capsa listens on) rather than ``--socket-path``, virtiofsd writes no
    pid file under /run/virtiofsd, which an unprivileged caller cannot create or write."""
    unshare = ["unshare", "--mount", "--propagation", "private"]
    if os.geteuid() != 0:
        unshare[1:1] = ["--user", "--map-root-user"]
    mode = "ro" if share.read_only else "rw"
    daemon = [
        virtiofsd,
        "-f",
        f"--fd={listen_fd}",
        "-o", f"source={fuse_escape(str(share.host_path))}",
        "-o", f"cache={CACHE_MODE}",
        "-o", "sandbox=namespace",
        "-o", "no_posix_lock",
        "-o", "writeback",
        "-o", "log_level=warn",
        "-o", "no_xattr",  # so no security.capability, ACL or security label ever reaches the host
        "-o", "modcaps=-mknod:-setfcap",  # the kernel refuses device nodes and file capabilities
    ]  # fmt: skip
    label = str(socket_path or "")
    wrapper = ["sh", "-c", _WRAPPER, "capsa-virtiofsd", str(share.host_path), mode, label]
    return [*unshare, *wrapper, *daemon]


async def start_virtiofsd(
    virtiofsd: str, share: ShareSpec, socket_path: Path, log_path: Path
) -> QemuProcess:
    """Listen on ``socket_path`` and start virtiofsd on that socket (QEMU connects at start; its
    connection waits in the backlog until virtiofsd accepts it)."""
    if shutil.which("unshare") is None:
        raise ShareError("unshare not found", hint="apt-get install util-linux")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(socket_path))
        listener.listen(1)
        argv = virtiofsd_argv(virtiofsd, share, listener.fileno(), socket_path)
        process = await QemuProcess.start(
            argv,
            pass_fds=(listener.fileno(),),
            log_path=log_path,
            name="virtiofsd",
            confine=seccomp_preexec(),
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise ShareError(
            f"virtiofsd for {share.host_path} could not be started: {exc}",
            host_path=share.host_path,
            hint="the kernel must support seccomp filters (CONFIG_SECCOMP_FILTER); "
            "or share with mechanism='9p'",
        ) from exc
    finally:
        listener.close()  # virtiofsd holds it now: if it dies, QEMU's connect fails at once
    with contextlib.suppress(CapsaTimeoutError):
        await process.wait(STARTUP_GRACE)
    if process.returncode is not None:
        raise ShareError(
            f"virtiofsd for {share.host_path} did not start (exit {process.returncode})",
            host_path=share.host_path,
            log_tail=process.log_tail(),
            hint="see the log tail; without root, user namespaces must be enabled "
            "(sysctl kernel.unprivileged_userns_clone=1); or share with mechanism='9p'",
        )
    return process
