"""Fetch a Debian kernel package through apt and unpack it without installing it.

``apt-get download`` needs no root and uses the host's configured mirrors and package signatures;
``dpkg-deb -x`` unpacks into a private directory. Results are cached under the capsa cache dir by exact
package version, so a second call costs a directory lookup.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from capsa._paths import cache_dir
from capsa.errors import ImageError

log = logging.getLogger(__name__)

_APT_TIMEOUT = 600.0


@dataclass(frozen=True)
class DebianKernel:
    """An unpacked Debian kernel: the bzImage, its modules directory and its config."""

    package: str
    version: str  # e.g. "6.1.0-57-cloud-amd64" (the uname -r string)
    kernel: Path
    modules_dir: Path
    config: Path


def _run(argv: list[str], cwd: Path | None = None) -> str:
    if shutil.which(argv[0]) is None:
        raise ImageError(
            f"{argv[0]} not found",
            hint="fetching Debian kernels needs a Debian/Ubuntu host with apt",
        )
    try:
        done = subprocess.run(
            argv, cwd=cwd, capture_output=True, text=True, timeout=_APT_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise ImageError(f"{' '.join(argv)} timed out after {_APT_TIMEOUT:.0f}s") from exc
    if done.returncode != 0:
        raise ImageError(
            f"{' '.join(argv)} failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}",
            hint="run 'apt-get update' and check that the package exists for this release",
        )
    return done.stdout


def resolve_kernel_package(flavour: str = "cloud-amd64") -> str:
    """Map a flavour metapackage (``linux-image-<flavour>``) to the concrete image package name."""
    meta = f"linux-image-{flavour}"
    out = _run(["apt-cache", "depends", meta])
    for raw in out.splitlines():
        line = raw.strip()
        if line.startswith("Depends:"):
            name = line.split(":", 1)[1].strip()
            if name.startswith("linux-image-") and name != meta:
                return name
    raise ImageError(
        f"cannot resolve kernel package for {meta}",
        hint="run 'apt-get update'; valid flavours include cloud-amd64 and amd64",
    )


def fetch_debian_kernel(
    flavour: str = "cloud-amd64", *, package: str | None = None, refresh: bool = False
) -> DebianKernel:
    """Download and unpack a Debian kernel (cached). ``package`` pins an exact image package name.

    The flavour's resolution (e.g. cloud-amd64 → linux-image-6.1.0-57-cloud-amd64) is remembered, so
    later calls work offline and keep using the same kernel until ``refresh=True`` asks apt again.
    """
    if package is None:
        pointer = cache_dir() / "kernels" / f"flavour-{flavour}"
        if not refresh and pointer.exists():
            package = pointer.read_text().strip()
        else:
            package = resolve_kernel_package(flavour)
            pointer.parent.mkdir(parents=True, exist_ok=True)
            pointer.write_text(package + "\n")
    root = cache_dir() / "kernels" / package
    unpacked = root / "root"
    if not (root / ".complete").exists():
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            log.info("downloading %s", package)
            _run(["apt-get", "download", package], cwd=Path(tmp))
            debs = list(Path(tmp).glob("*.deb"))
            if len(debs) != 1:
                raise ImageError(f"apt-get download {package} produced {len(debs)} .deb files")
            staging = Path(tmp) / "root"
            _run(["dpkg-deb", "-x", str(debs[0]), str(staging)])
            if unpacked.exists():
                shutil.rmtree(unpacked)
            staging.rename(unpacked)
        (root / ".complete").write_text(package + "\n")
    kernels = sorted((unpacked / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise ImageError(f"expected one vmlinuz in {package}, found {len(kernels)}")
    version = kernels[0].name.removeprefix("vmlinuz-")
    return DebianKernel(
        package=package,
        version=version,
        kernel=kernels[0],
        modules_dir=unpacked / "lib" / "modules" / version,
        config=unpacked / "boot" / f"config-{version}",
    )
