"""Build initramfs archives: busybox-static, an ``/init`` script, kernel modules, extra files.

The archive is left uncompressed on purpose: under TCG the guest kernel decompresses at emulated speed,
so a few extra MB of memcpy is much cheaper than gunzip.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from capsa.errors import ImageError
from capsa.image.cpio import CpioWriter
from capsa.image.modules import KernelModule, ModuleIndex

if TYPE_CHECKING:
    from capsa.image.kernels import GuestKernel

_BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")


def find_busybox() -> Path:
    """The host's busybox, which must be statically linked to run inside a bare initramfs."""
    for candidate in _BUSYBOX_CANDIDATES:
        path = Path(candidate)
        if path.exists():
            head = path.read_bytes()[:4096]
            if b"/lib64/ld-linux" in head or b"ld-linux-x86-64" in head:
                continue  # dynamically linked busybox cannot run without a libc in the initramfs
            return path
    found = shutil.which("busybox")
    if found:
        return Path(found)
    raise ImageError("no static busybox found", hint="install it: apt-get install busybox-static")


def _applets(busybox: Path) -> list[str]:
    try:
        out = subprocess.run(
            [str(busybox), "--list-full"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise ImageError(f"cannot list busybox applets: {exc}") from exc
    return [line.strip() for line in out.splitlines() if line.strip()]


class InitramfsBuilder:
    """Collects entries for one initramfs; ``write()`` emits it. Parent directories are implicit."""

    def __init__(self, busybox: Path | None = None) -> None:
        self._busybox = busybox or find_busybox()
        self._files: dict[str, tuple[bytes, int]] = {}
        self._symlinks: dict[str, str] = {}
        self._module_paths: list[str] = []

    def file(self, guest_path: str, data: bytes, mode: int = 0o644) -> InitramfsBuilder:
        self._files[guest_path.strip("/")] = (data, mode)
        return self

    def host_file(self, guest_path: str, host_path: Path, mode: int = 0o755) -> InitramfsBuilder:
        try:
            data = host_path.read_bytes()
        except OSError as exc:
            raise ImageError(f"cannot read {host_path}: {exc}") from exc
        return self.file(guest_path, data, mode)

    def symlink(self, guest_path: str, target: str) -> InitramfsBuilder:
        self._symlinks[guest_path.strip("/")] = target
        return self

    def init_script(self, script: str) -> InitramfsBuilder:
        if not script.startswith("#!"):
            raise ImageError("init script must start with a #! line (e.g. #!/bin/sh)")
        return self.file("init", script.encode(), 0o755)

    def modules(self, index: ModuleIndex, names: Iterable[str]) -> list[KernelModule]:
        """Add the named modules and their dependencies; returns them in load order.

        They land in ``/lib/modules/`` as ``NN-name.ko`` so ``for m in /lib/modules/*.ko`` loads them
        in dependency order.
        """
        order = index.load_order(list(names))
        start = len(self._module_paths)
        for i, module in enumerate(order, start=start):
            guest = f"lib/modules/{i:03d}-{module.name}.ko"
            self.file(guest, index.read(module), 0o644)
            self._module_paths.append(guest)
        return order

    def write(self, out: Path) -> Path:
        dirs: set[str] = {"dev", "proc", "sys", "tmp", "run", "root", "mnt", "bin", "sbin", "etc"}
        for name in [*self._files, *self._symlinks]:
            parts = name.split("/")[:-1]
            dirs.update("/".join(parts[: i + 1]) for i in range(len(parts)))
        applets = [a.strip("/") for a in _applets(self._busybox)]
        for applet in applets:
            parts = applet.split("/")[:-1]
            dirs.update("/".join(parts[: i + 1]) for i in range(len(parts)))
        tmp = out.with_name(out.name + ".part")
        with tmp.open("wb") as fh:
            cpio = CpioWriter(fh)
            for d in sorted(dirs, key=lambda p: (p.count("/"), p)):
                cpio.add_dir(d, 0o1777 if d == "tmp" else 0o755)
            cpio.add_char_device("dev/console", 5, 1)
            cpio.add_char_device("dev/null", 1, 3, 0o666)
            cpio.add_host_file("bin/busybox", self._busybox, 0o755)
            taken = {"bin/busybox", *self._files, *self._symlinks}
            for applet in applets:
                if applet not in taken:
                    cpio.add_symlink(applet, "/bin/busybox")
            for name, target in sorted(self._symlinks.items()):
                cpio.add_symlink(name, target)
            for name, (data, mode) in sorted(self._files.items()):
                cpio.add_file(name, data, mode)
            cpio.close()
        tmp.replace(out)
        return out


def cached_initramfs(
    init: str,
    directory: Path,
    prefix: str,
    *,
    kernel: GuestKernel,
    modules: Sequence[str] = (),
    files: Mapping[str, bytes] | None = None,
) -> Path:
    """``directory/<prefix>-<kernel release>-<recipe hash>.cpio``: busybox, ``init``, the kernel's
    ``modules`` (with their dependencies; none for a kernel without modules) and extra ``files``
    (guest path → content), written only if that recipe has not been built before."""
    files = dict(files or {})
    wanted = list(modules) if kernel.modules_dir is not None else []
    digest = hashlib.sha256("\n".join([kernel.key, init, *wanted]).encode())
    for name in sorted(files):
        digest.update(b"\0" + name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    key = digest.hexdigest()[:16]
    path = directory / f"{prefix}-{kernel.release}-{key}.cpio"
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        builder = InitramfsBuilder()
        if kernel.modules_dir is not None:
            builder.modules(ModuleIndex(kernel.modules_dir), wanted)
        builder.init_script(init)
        for name, data in files.items():
            builder.file(name, data, 0o755 if data.startswith(b"#!") else 0o644)
        builder.write(path)
    return path
