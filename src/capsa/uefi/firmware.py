"""Find OVMF (UEFI firmware for QEMU) and check a code/variable-store pair before QEMU sees it."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from capsa.errors import ConfigError

OVMF_DIRS = (Path("/usr/share/OVMF"), Path("/usr/share/edk2/ovmf"), Path("/usr/share/edk2/x64"))
# (code, vars) file names, best first: Debian's 4 MiB builds, then Fedora's and older 2 MiB ones.
PLAIN_PAIRS = (
    ("OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd"),
    ("OVMF_CODE.fd", "OVMF_VARS.fd"),
)
# Secure Boot: SMM-protected code with a store enrolled with Microsoft's keys (what signed shim needs).
SECURE_PAIRS = (
    ("OVMF_CODE_4M.secboot.fd", "OVMF_VARS_4M.ms.fd"),
    ("OVMF_CODE.secboot.fd", "OVMF_VARS.ms.fd"),
    ("OVMF_CODE.secboot.fd", "OVMF_VARS.secboot.fd"),
)
# pflash images QEMU maps right below 4 GiB; the code and vars halves must add up to one flash chip.
KNOWN_SPLITS = {1966080: 131072, 3653632: 540672}
_PK_NAME = "PK\0".encode("utf-16-le")  # the variable's name as the store holds it
INSTALL_HINT = "install the firmware: apt-get install ovmf (Fedora: edk2-ovmf)"


@dataclass(frozen=True)
class Firmware:
    code: Path
    vars_template: Path
    secure_boot: bool

    @property
    def flash_bytes(self) -> int:
        return self.code.stat().st_size + self.vars_template.stat().st_size


def _search_dirs() -> tuple[Path, ...]:
    extra = os.environ.get("CAPSA_OVMF_DIR")
    return ((Path(extra),) if extra else ()) + OVMF_DIRS


def find_firmware(secure_boot: bool = False) -> Firmware:
    """The installed OVMF pair (Secure Boot capable one with ``secure_boot``), or a ConfigError that
    names the package to install."""
    pairs = SECURE_PAIRS if secure_boot else PLAIN_PAIRS
    for directory in _search_dirs():
        for code, variables in pairs:
            if (directory / code).is_file() and (directory / variables).is_file():
                return Firmware(directory / code, directory / variables, secure_boot)
    what = "Secure Boot OVMF firmware (OVMF_CODE*.secboot.fd)" if secure_boot else "OVMF firmware"
    searched = ", ".join(str(d) for d in _search_dirs())
    raise ConfigError(f"UEFI boot needs {what}, not found in {searched}", hint=INSTALL_HINT)


def _check_file(path: Path, what: str) -> int:
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a directory, not a firmware image")
    try:
        with path.open("rb"):
            pass
        size = path.stat().st_size
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path}", hint=INSTALL_HINT) from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None
    if size == 0 or size % 4096:
        raise ConfigError(f"{what} {path} is {size} bytes: not a flash image (a multiple of 4 KiB)")
    return size


def check_pair(code: Path, variables: Path) -> None:
    """Refuse a code/vars pair QEMU would map wrongly (e.g. 4 MiB code with a 2 MiB-build store)."""
    code_size = _check_file(code, "UEFI firmware")
    vars_size = _check_file(variables, "UEFI variable store")
    expected = KNOWN_SPLITS.get(code_size)
    total = code_size + vars_size
    if (expected is not None and vars_size != expected) or total & (total - 1):
        raise ConfigError(
            f"UEFI firmware {code} ({code_size} bytes) and variable store {variables} "
            f"({vars_size} bytes) are not halves of one flash image",
            hint="use the OVMF_VARS file built with that OVMF_CODE (e.g. OVMF_CODE_4M.fd with "
            "OVMF_VARS_4M.fd)",
        )


def resolve(firmware: Path | None, variables: Path | None, secure_boot: bool) -> tuple[Path, Path]:
    """(code, vars template) for a UefiBoot: the user's firmware, else the installed OVMF. A user
    ``vars`` file that does not exist yet is created from the template at start."""
    if firmware is None:
        found = find_firmware(secure_boot)
        code, template = found.code, found.vars_template
    elif variables is not None and variables.exists():
        code, template = firmware, variables
    else:
        code, template = firmware, _sibling_vars(firmware)
    if variables is not None and variables.exists():
        if variables.is_dir():
            raise ConfigError(f"UEFI variable store {variables} is a directory")
        if not os.access(variables, os.R_OK | os.W_OK):
            raise ConfigError(f"UEFI variable store {variables} must be readable and writable")
        check_pair(code, variables)
    else:
        check_pair(code, template)
    if secure_boot:
        store = variables if variables is not None and variables.exists() else template
        check_keys_enrolled(store)
    return code, template


def check_keys_enrolled(store: Path) -> None:
    """Secure Boot is only on when a Platform Key is enrolled: refuse a store without the ``PK``
    variable (e.g. the plain OVMF_VARS_4M.fd), which would boot anything with Secure Boot off."""
    if _PK_NAME not in store.read_bytes():
        raise ConfigError(
            f"secure_boot=True, but the UEFI variable store {store} has no Secure Boot keys enrolled "
            "(no PK variable): the firmware would boot with Secure Boot off",
            hint="use a store with enrolled keys, e.g. OVMF_VARS_4M.ms.fd (the default with "
            "secure_boot=True)",
        )


def _sibling_vars(code: Path) -> Path:
    """The template next to a user-given OVMF_CODE*.fd (OVMF_CODE_4M.fd -> OVMF_VARS_4M.fd)."""
    name = code.name
    candidates = [code.with_name(name.replace("CODE", "VARS"))]
    if ".secboot" in name:
        candidates.insert(0, code.with_name(name.replace("CODE", "VARS").replace(".secboot", ".ms")))
    for candidate in candidates:
        if candidate != code and candidate.is_file():
            return candidate
    raise ConfigError(
        f"no variable store found next to the UEFI firmware {code}",
        hint="pass vars= (an OVMF_VARS file matching the firmware)",
    )


def copy_vars(template: Path, target: Path) -> Path:
    """A private, writable copy of the variable store (QEMU does not stop two VMs sharing one)."""
    shutil.copyfile(template, target)
    target.chmod(0o600)
    return target
