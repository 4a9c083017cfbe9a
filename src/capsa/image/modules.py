"""Resolve Linux kernel modules and their dependencies in an extracted kernel package.

A Debian ``linux-image-*`` package ships ``.ko`` files but not ``modules.dep`` (``depmod`` writes it at
install time, and we never install the package). The same dependency list is recorded by the kernel
build (modpost) in each module's ``.modinfo`` ELF section as ``depends=a,b``, plus ``softdep=pre: x``
hints, so we read it from there: no ``kmod`` on the host and no root needed. If the tree does contain a
``modules.dep`` (a user-supplied, installed tree), it is used instead.
"""

from __future__ import annotations

import lzma
import struct
from dataclasses import dataclass
from pathlib import Path

from capsa.errors import ImageError


@dataclass(frozen=True)
class KernelModule:
    name: str  # canonical name, dashes folded to underscores ("virtio_blk")
    path: Path
    depends: tuple[str, ...]
    softdeps_pre: tuple[str, ...]


def _canonical(name: str) -> str:
    return name.replace("-", "_")


def _module_name(path: Path) -> str:
    base = path.name
    for suffix in (".ko.xz", ".ko.zst", ".ko.gz", ".ko"):
        if base.endswith(suffix):
            return _canonical(base[: -len(suffix)])
    return _canonical(base)


def _read_ko(path: Path) -> bytes:
    raw = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(raw)
    if path.name.endswith((".zst", ".gz")):
        raise ImageError(f"compressed module format not supported: {path}", hint="use .ko or .ko.xz")
    return raw


def read_modinfo(elf: bytes) -> dict[str, list[str]]:
    """Return the key=value pairs of an ELF64 module's ``.modinfo`` section (keys may repeat)."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2:
        raise ImageError("not an ELF64 kernel module")
    (shoff,) = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)

    def section(index: int) -> tuple[int, int, int]:
        base = shoff + index * shentsize
        name_off = struct.unpack_from("<I", elf, base)[0]
        offset, size = struct.unpack_from("<QQ", elf, base + 0x18)
        return name_off, offset, size

    _, str_off, str_size = section(shstrndx)
    names = elf[str_off : str_off + str_size]
    for i in range(shnum):
        name_off, offset, size = section(i)
        end = names.find(b"\0", name_off)
        if names[name_off:end] == b".modinfo":
            info: dict[str, list[str]] = {}
            for item in elf[offset : offset + size].split(b"\0"):
                key, sep, value = item.decode(errors="replace").partition("=")
                if sep:
                    info.setdefault(key, []).append(value)
            return info
    return {}


def _parse_softdep(values: list[str]) -> tuple[str, ...]:
    pre: list[str] = []
    for value in values:
        words = value.split()
        mode = ""
        for word in words:
            if word.endswith(":"):
                mode = word[:-1]
            elif mode == "pre":
                pre.append(_canonical(word))
    return tuple(pre)


class ModuleIndex:
    """All modules of one kernel version directory (``lib/modules/<version>``)."""

    def __init__(self, modules_dir: Path) -> None:
        if not modules_dir.is_dir():
            raise ImageError(f"kernel modules directory not found: {modules_dir}")
        self.root = modules_dir
        self._paths = {_module_name(p): p for p in sorted(modules_dir.rglob("*.ko*"))}
        self._deps = self._load_modules_dep()
        self._cache: dict[str, KernelModule] = {}

    def _load_modules_dep(self) -> dict[str, tuple[str, ...]] | None:
        dep_file = self.root / "modules.dep"
        if not dep_file.exists():
            return None
        deps: dict[str, tuple[str, ...]] = {}
        for line in dep_file.read_text().splitlines():
            target, _, rest = line.partition(":")
            deps[_module_name(Path(target))] = tuple(_module_name(Path(d)) for d in rest.split())
        return deps

    def __contains__(self, name: str) -> bool:
        return _canonical(name) in self._paths

    def get(self, name: str) -> KernelModule:
        key = _canonical(name)
        if key in self._cache:
            return self._cache[key]
        path = self._paths.get(key)
        if path is None:
            raise ImageError(
                f"kernel module {name!r} not found under {self.root}",
                hint="the driver may be built into this kernel (check modules.builtin)",
            )
        info = read_modinfo(_read_ko(path))
        if self._deps is not None:
            depends = self._deps.get(key, ())
        else:
            depends = tuple(_canonical(d) for v in info.get("depends", []) for d in v.split(",") if d)
        module = KernelModule(key, path, depends, _parse_softdep(info.get("softdep", [])))
        self._cache[key] = module
        return module

    def is_builtin(self, name: str) -> bool:
        builtin = self.root / "modules.builtin"
        if not builtin.exists():
            return False
        wanted = _canonical(name)
        return any(_module_name(Path(line)) == wanted for line in builtin.read_text().splitlines())

    def load_order(self, names: list[str]) -> list[KernelModule]:
        """Modules to insmod, dependencies (and available pre-softdeps) first, each once.

        Names built into the kernel are skipped silently; unknown names raise ``ImageError``.
        """
        order: list[KernelModule] = []
        done: set[str] = set()
        visiting: set[str] = set()

        def visit(name: str, optional: bool) -> None:
            key = _canonical(name)
            if key in done:
                return
            if key not in self._paths:
                if optional or self.is_builtin(key):
                    done.add(key)
                    return
                self.get(key)  # raises a helpful ImageError
            if key in visiting:
                return  # dependency cycles do not occur in real trees; never loop
            visiting.add(key)
            module = self.get(key)
            for soft in module.softdeps_pre:
                visit(soft, optional=True)
            for dep in module.depends:
                visit(dep, optional=False)
            visiting.discard(key)
            done.add(key)
            order.append(module)

        for name in names:
            visit(name, optional=False)
        return order

    def read(self, module: KernelModule) -> bytes:
        """The module's bytes, decompressed (busybox insmod cannot read .ko.xz)."""
        return _read_ko(module.path)
