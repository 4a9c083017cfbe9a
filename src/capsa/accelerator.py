"""Choose KVM or TCG.

``/dev/kvm`` existing is not proof that KVM works: on nested PVM hosts (docs/architecture.md
§Facts) a stock kernel stalls forever in early boot while QEMU reports "running". So ``auto`` boots
the VM's own kernel under KVM once, without a root filesystem, and accepts KVM only if the kernel
gets all the way to its "cannot mount root" panic (the VM then exits thanks to ``panic=-1`` and
``-no-reboot``). The verdict is cached per host (kernel release, CPU model, QEMU binary) in the
cache dir.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import shutil
from pathlib import Path
from typing import Literal

from capsa._guardian import new_vm_dir
from capsa._paths import cache_dir
from capsa.backend.qemu.process import SECCOMP, QemuProcess, find_qemu
from capsa.errors import CapsaTimeoutError, ConfigError

log = logging.getLogger(__name__)

Resolved = Literal["kvm", "tcg"]
PROBE_TIMEOUT = 8.0
_PROBE_MARKERS = (b"Kernel panic", b"VFS: Unable to mount root")


def kvm_device_usable() -> bool:
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


@functools.cache
def host_tsc_khz() -> int | None:
    """The host CPU clock in kHz (for ``tsc_early_khz``), from /proc/cpuinfo; read once per process
    rather than on every VM start."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("cpu MHz"):
                    return int(float(line.split(":", 1)[1]) * 1000)
    except (OSError, ValueError):
        pass
    return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _host_key(qemu: str) -> str:
    st = os.stat(qemu)
    raw = "|".join(
        [
            platform.release(),
            platform.version(),
            _cpu_model(),
            qemu,
            str(st.st_size),
            str(int(st.st_mtime)),
        ]
    )
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def _verdict_file() -> Path:
    return cache_dir() / "kvm-verdict.json"


def cached_verdict(qemu: str) -> bool | None:
    try:
        data = json.loads(_verdict_file().read_text())
        value = data.get(_host_key(qemu))
        return value if isinstance(value, bool) else None
    except (OSError, ValueError, AttributeError):
        return None


def _store_verdict(qemu: str, ok: bool) -> None:
    path = _verdict_file()
    try:
        data = json.loads(path.read_text()) if path.exists() else {}
        if not isinstance(data, dict):
            data = {}
    except (OSError, ValueError):
        data = {}
    data[_host_key(qemu)] = ok
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


async def probe_kvm(kernel: Path, qemu: str, timeout: float = PROBE_TIMEOUT) -> bool:
    """Boot ``kernel`` under KVM to its no-root panic. True only if it gets there in time."""
    tmp = new_vm_dir("kvm-probe-")
    try:
        serial = tmp / "serial.log"
        argv = [
            qemu, "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-M", "microvm,acpi=on", "-accel", "kvm", "-cpu", "host", "-m", "256M",
            "-sandbox", SECCOMP, "-kernel", str(kernel),
            "-append", "console=ttyS0 panic=-1 root=/dev/capsa-kvm-probe",
            "-serial", f"file:{serial}",
        ]  # fmt: skip
        proc = await QemuProcess.start(argv, pass_fds=(), log_path=tmp / "qemu.log")
        try:
            await proc.wait(timeout)
        except CapsaTimeoutError:
            log.info("KVM probe: guest did not finish booting in %.0fs; using TCG", timeout)
            return False
        finally:
            await proc.kill_and_wait()
        output = serial.read_bytes() if serial.exists() else b""
        ok = any(marker in output for marker in _PROBE_MARKERS)
        if not ok:
            log.info("KVM probe failed: %s", proc.log_tail(5) or "no panic marker")
        return ok
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


async def resolve_accelerator(requested: str, kernel: Path) -> Resolved:
    if requested == "tcg":
        return "tcg"
    if requested == "kvm":
        if not kvm_device_usable():
            raise ConfigError(
                "accelerator 'kvm' requested but /dev/kvm is missing or not accessible",
                hint="use accelerator('auto') or add your user to the 'kvm' group",
            )
        return "kvm"
    if requested != "auto":
        raise ConfigError(f"unknown accelerator {requested!r}; use 'auto', 'kvm' or 'tcg'")
    if not kvm_device_usable():
        return "tcg"
    qemu = find_qemu()
    verdict = cached_verdict(qemu)
    if verdict is None:
        verdict = await probe_kvm(kernel, qemu)
        _store_verdict(qemu, verdict)
        log.info("KVM probe verdict: %s", "usable" if verdict else "unusable, falling back to TCG")
    return "kvm" if verdict else "tcg"
