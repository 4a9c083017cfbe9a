"""Build, cache and verify capsa's guest kernel (see the package docstring for why)."""

from __future__ import annotations

import fcntl
import functools
import glob
import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from capsa._paths import cache_dir
from capsa.errors import ImageError

log = logging.getLogger(__name__)

CONFIG_FRAGMENT = Path(__file__).with_name("capsa.config")
SOURCE_GLOB = "/usr/src/linux-source-6.1.tar.xz"
RECIPE_VERSION = "1"  # bump when the build steps change in a way that changes the result
STEP_TIMEOUT = 3600.0
REPORT_EVERY = 15.0  # seconds between progress reports of a long step
ARCH = "ARCH=x86_64"  # tinyconfig would default to 32-bit without it
_TOOLS = {
    "gcc": "build-essential",
    "make": "make",
    "bison": "bison",
    "flex": "flex",
    "bc": "bc",
    "lz4": "lz4",
    "xz": "xz-utils",
    "perl": "perl",
}

Progress = Callable[[str], None]


@dataclass(frozen=True)
class KernelSource:
    tarball: Path
    version: str  # the Debian package version, e.g. "6.1.192-3"


@dataclass(frozen=True)
class BuiltKernel:
    """A kernel capsa built: ``bzimage`` (compressed, for any loader) and ``vmlinux`` (uncompressed
    ELF that QEMU boots through its PVH entry, skipping the decompressor)."""

    directory: Path
    bzimage: Path
    vmlinux: Path
    config: Path
    source_version: str
    release: str  # ``uname -r`` in the guest


def find_kernel_source() -> KernelSource:
    matches = sorted(glob.glob(SOURCE_GLOB))
    if not matches:
        raise ImageError(
            f"no kernel source at {SOURCE_GLOB}",
            hint="apt-get install linux-source-6.1 (the setup script does)",
        )
    tarball = Path(matches[-1])
    st = tarball.stat()
    return _source_version(str(tarball), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _source_version(tarball_path: str, size: int, mtime_ns: int) -> KernelSource:
    """Asking dpkg costs a process; once per tarball state and process is enough."""
    tarball = Path(tarball_path)
    version = ""
    if shutil.which("dpkg-query"):
        done = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", "linux-source-6.1"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        version = done.stdout.strip() if done.returncode == 0 else ""
    if not version:
        version = f"{size}-{mtime_ns}"
    return KernelSource(tarball, version)


def missing_build_tools() -> list[str]:
    """Debian packages to install before the kernel can be built (empty when all is there)."""
    missing = {package for tool, package in _TOOLS.items() if shutil.which(tool) is None}
    if not any(Path(p).exists() for p in ("/usr/include/libelf.h", "/usr/include/gelf.h")):
        missing.add("libelf-dev")  # objtool, which x86_64 builds always run, links libelf
    return sorted(missing)


def _key(source: KernelSource) -> str:
    digest = hashlib.sha256(CONFIG_FRAGMENT.read_bytes())
    digest.update(f"\0{source.version}\0{RECIPE_VERSION}".encode())
    return digest.hexdigest()[:12]


def _kernels_dir() -> Path:
    path = cache_dir() / "kernels"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@functools.lru_cache(maxsize=16)
def _verified(path: str, size: int, mtime_ns: int, expected: str) -> bool:
    """Hash each cached file once per process (keyed by its size and mtime)."""
    return _sha256(Path(path)) == expected


def _load(directory: Path) -> BuiltKernel | None:
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
        files = {name: directory / name for name in ("bzImage", "vmlinux", "config")}
        for name, path in files.items():
            st = path.stat()
            if not _verified(str(path), st.st_size, st.st_mtime_ns, manifest["sha256"][name]):
                log.warning("cached kernel file %s is corrupt; it will be rebuilt", path)
                return None
        return BuiltKernel(
            directory=directory,
            bzimage=files["bzImage"],
            vmlinux=files["vmlinux"],
            config=files["config"],
            source_version=manifest["source_version"],
            release=manifest["release"],
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def built_kernel() -> BuiltKernel | None:
    """The cached kernel for the installed source and the current config fragment, if it is built
    and intact; ``None`` otherwise (no source installed, never built, or corrupt)."""
    try:
        source = find_kernel_source()
    except ImageError:
        return None
    return _load(_kernels_dir() / f"capsa-{source.version}-{_key(source)}")


@contextmanager
def _build_lock(directory: Path) -> Iterator[None]:
    with (directory / ".build.lock").open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_kernel(
    progress: Progress | None = None, *, rebuild: bool = False, jobs: int | None = None
) -> BuiltKernel:
    """Build (or return the cached) capsa kernel. Takes a few minutes; the log is kept next to it."""
    source = find_kernel_source()
    missing = missing_build_tools()
    if missing:
        raise ImageError(
            f"cannot build the kernel: missing {', '.join(missing)}",
            hint=f"apt-get install {' '.join(missing)}",
        )
    kernels = _kernels_dir()
    name = f"capsa-{source.version}-{_key(source)}"
    target = kernels / name
    with _build_lock(kernels):
        if not rebuild and (cached := _load(target)) is not None:
            return cached
        log_path = kernels / f"{name}.build.log"
        work = Path(tempfile.mkdtemp(prefix=".build-", dir=kernels))
        try:
            _compile(source, work, log_path, progress, jobs or os.cpu_count() or 1)
            staging = kernels / f".{name}.staging"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            shutil.copy2(work / "arch/x86/boot/bzImage", staging / "bzImage")
            shutil.copy2(work / "vmlinux", staging / "vmlinux")
            shutil.copy2(work / ".config", staging / "config")
            release = (work / "include/config/kernel.release").read_text().strip()
            manifest = {
                "source_version": source.version,
                "release": release,
                "sha256": {f: _sha256(staging / f) for f in ("bzImage", "vmlinux", "config")},
            }
            (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)
            log_path.replace(target / "build.log")
        finally:
            shutil.rmtree(work, ignore_errors=True)
    loaded = _load(target)
    if loaded is None:
        raise ImageError(
            f"the kernel built in {target} does not verify", hint="capsa kernel build --rebuild"
        )
    return loaded


def _compile(
    source: KernelSource, work: Path, log_path: Path, progress: Progress | None, jobs: int
) -> None:
    with log_path.open("w") as log_file:
        run = _StepRunner(work, log_file, log_path, progress)
        tarball = str(source.tarball)
        run("unpacking the source", ["tar", "-xf", tarball, "-C", str(work), "--strip-components=1"])
        run("configuring (tinyconfig)", ["make", ARCH, "tinyconfig"])
        # Later assignments win in a .config, so the fragment is appended, then completed.
        with (work / ".config").open("a") as config:
            config.write("\n" + CONFIG_FRAGMENT.read_text())
        run("configuring (capsa.config)", ["make", ARCH, "olddefconfig"])
        check_config(work / ".config")
        run(f"compiling with {jobs} jobs (a few minutes)", ["make", ARCH, f"-j{jobs}", "bzImage"])


@dataclass
class _StepRunner:
    cwd: Path
    log_file: TextIO
    log_path: Path
    progress: Progress | None

    def __call__(self, title: str, argv: list[str]) -> None:
        if self.progress:
            self.progress(f"kernel: {title}")
        log.info("kernel build: %s", title)
        self.log_file.write(f"\n$ {' '.join(argv)}\n")
        self.log_file.flush()
        started = self.log_file.tell()
        process = subprocess.Popen(
            argv, cwd=self.cwd, stdin=subprocess.DEVNULL, stdout=self.log_file,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            code = self._wait(process, title, started)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        if code != 0:
            raise ImageError(
                f"kernel build failed while {title} (exit {code}); log: {self.log_path}",
                hint="sandboxes fall back to the stock Debian kernel meanwhile",
            )

    def _wait(self, process: subprocess.Popen[bytes], title: str, log_offset: int) -> int:
        """Wait for one step, telling ``progress`` every :data:`REPORT_EVERY` seconds how long it
        has run and how many files it compiled: a silent step of several minutes looks hung."""
        began = time.monotonic()
        report_at = began + REPORT_EVERY
        while True:
            try:
                return process.wait(timeout=min(1.0, REPORT_EVERY))
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic()
            if now - began > STEP_TIMEOUT:
                raise ImageError(f"kernel build step '{title}' timed out", hint=f"see {self.log_path}")
            if self.progress and now >= report_at:
                compiled = _compiled_files(self.log_path, log_offset)
                self.progress(f"kernel: {title}: {now - began:.0f}s, {compiled} files compiled")
                report_at = now + REPORT_EVERY


def _compiled_files(log_path: Path, offset: int) -> int:
    """How many ``  CC``/``  AS`` lines the build log has after ``offset``."""
    try:
        with log_path.open("rb") as log_file:
            log_file.seek(offset)
            text = log_file.read()
    except OSError:
        return 0
    return sum(1 for line in text.splitlines() if line.startswith((b"  CC ", b"  AS ")))


def parse_config(text: str) -> dict[str, str]:
    """``CONFIG_X=v`` → ``{"CONFIG_X": "v"}``; ``# CONFIG_X is not set`` → ``"n"``."""
    values: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("# CONFIG_") and line.endswith(" is not set"):
            values[line[2:].split()[0]] = "n"
        elif line.startswith("CONFIG_") and "=" in line:
            key, _, value = line.partition("=")
            values[key] = value
    return values


def check_config(final: Path) -> None:
    """Every option of the fragment must have its value in the final .config: kconfig silently drops
    an option whose dependencies are not met, and a sandbox would then miss a driver."""
    wanted = parse_config(CONFIG_FRAGMENT.read_text())
    got = parse_config(final.read_text())
    wrong = [
        f"{key}={value} (got {got.get(key, 'n')})"
        for key, value in wanted.items()
        if got.get(key, "n") != value
    ]
    if wrong:
        raise ImageError(
            "kernel config options did not survive olddefconfig: " + ", ".join(wrong),
            hint=f"add their dependencies to {CONFIG_FRAGMENT}",
        )
