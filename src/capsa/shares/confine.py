"""A seccomp filter for virtiofsd: the host kernel refuses every mode that would give privileges.

Whoever runs virtiofsd owns the files a guest creates, and a file's owner may always make it
set-uid. Guest root could therefore leave set-uid/set-gid programs (set-uid *root* when capsa runs
as root) or device nodes such as /dev/mem's ``c 1 3`` in a read-write share, for a host user to run
or open later. virtiofsd has no option against that, so capsa starts it under a seccomp filter
(installed between ``fork`` and ``exec``, inherited by every thread and child) that fails with ``EPERM``:

* ``chmod``/``fchmod``/``fchmodat``/``fchmodat2`` with set-uid or set-gid bits;
* ``open``/``openat``/``creat``/``mkdir``/``mkdirat`` creating with those bits;
* ``mknod``/``mknodat`` of a character or block device, or with those bits;
* ``renameat2`` with ``RENAME_WHITEOUT`` (which leaves a 0,0 character device);
* every ``set*xattr`` (virtiofsd runs without xattr support, so ``security.capability`` and ACLs
  can never be written), and ``openat2``/``io_uring_setup`` (``ENOSYS``), which would bypass the
  argument checks above.

Only the arguments a seccomp filter can read (registers, not memory) are checked; the filter adds
well under a microsecond to those system calls.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import platform
import struct
import sys
from collections.abc import Callable

from capsa.errors import ShareError

# BPF opcodes and seccomp constants (linux/filter.h, linux/seccomp.h, linux/audit.h).
_LD_ABS = 0x20
_JEQ = 0x15
_JGE = 0x35
_JSET = 0x45
_AND = 0x54
_RET = 0x06
_ALLOW = 0x7FFF0000
_ERRNO = 0x00050000
_PRIVILEGE_BITS = 0o6000  # S_ISUID | S_ISGID
_S_IFMT, _S_IFCHR, _S_IFBLK = 0o170000, 0o020000, 0o060000
_RENAME_WHITEOUT = 4
_X32_BIT = 0x40000000

_ARCHES: dict[str, tuple[int, dict[str, int]]] = {
    "x86_64": (
        0xC000003E,
        {
            "chmod": 90, "fchmod": 91, "fchmodat": 268, "fchmodat2": 452, "open": 2, "openat": 257,
            "creat": 85, "mkdir": 83, "mkdirat": 258, "mknod": 133, "mknodat": 259,
            "renameat2": 316, "openat2": 437, "io_uring_setup": 425, "setxattr": 188,
            "lsetxattr": 189, "fsetxattr": 190, "setxattrat": 463,
        },
    ),
    "aarch64": (
        0xC00000B7,
        {
            "fchmod": 52, "fchmodat": 53, "fchmodat2": 452, "openat": 56, "mkdirat": 34,
            "mknodat": 33, "renameat2": 276, "openat2": 437, "io_uring_setup": 425,
            "setxattr": 5, "lsetxattr": 6, "fsetxattr": 7, "setxattrat": 463,
        },
    ),
}  # fmt: skip

# Which argument holds the mode for each checked call.
_MODE_ARG = {
    "chmod": 1, "fchmod": 1, "fchmodat": 2, "fchmodat2": 2, "open": 2, "openat": 3, "creat": 1,
    "mkdir": 1, "mkdirat": 2,
}  # fmt: skip
_MKNOD_ARG = {"mknod": 1, "mknodat": 2}
_DENIED = {
    "openat2": errno.ENOSYS, "io_uring_setup": errno.ENOSYS, "setxattr": errno.EPERM,
    "lsetxattr": errno.EPERM, "fsetxattr": errno.EPERM, "setxattrat": errno.EPERM,
}  # fmt: skip

Insn = tuple[int, int, int, int]


def _arg_low(index: int) -> int:
    """Offset of the low 32 bits of argument ``index`` in ``struct seccomp_data`` (little endian)."""
    return 16 + 8 * index


def _ret(value: int) -> Insn:
    return (_RET, 0, 0, value)


def _deny(code: int = errno.EPERM) -> Insn:
    return _ret(_ERRNO | code)


def _mode_block(arg: int) -> list[Insn]:
    return [
        (_LD_ABS, 0, 0, _arg_low(arg)),
        (_JSET, 0, 1, _PRIVILEGE_BITS),
        _deny(),
        _ret(_ALLOW),
    ]


def _mknod_block(arg: int) -> list[Insn]:
    return [
        (_LD_ABS, 0, 0, _arg_low(arg)),
        (_JSET, 4, 0, _PRIVILEGE_BITS),
        (_AND, 0, 0, _S_IFMT),
        (_JEQ, 2, 0, _S_IFCHR),
        (_JEQ, 1, 0, _S_IFBLK),
        _ret(_ALLOW),
        _deny(),
    ]


def _rename_block() -> list[Insn]:
    return [
        (_LD_ABS, 0, 0, _arg_low(4)),
        (_JSET, 0, 1, _RENAME_WHITEOUT),
        _deny(),
        _ret(_ALLOW),
    ]


def filter_program(machine: str | None = None) -> bytes:
    """The filter as ``struct sock_filter`` array bytes, for this host's architecture."""
    machine = machine or platform.machine()
    if machine not in _ARCHES or sys.byteorder != "little":
        raise ShareError(
            f"no seccomp filter for virtiofsd on {machine}",
            hint="share with mechanism='9p' on this host",
        )
    audit_arch, numbers = _ARCHES[machine]
    program: list[Insn] = [
        (_LD_ABS, 0, 0, 4),  # seccomp_data.arch
        (_JEQ, 1, 0, audit_arch),
        _deny(errno.ENOSYS),  # another ABI (i386 via int 0x80): nothing virtiofsd needs
        (_LD_ABS, 0, 0, 0),  # seccomp_data.nr
    ]
    if machine == "x86_64":
        program += [(_JGE, 0, 1, _X32_BIT), _deny(errno.ENOSYS)]
    for name, number in numbers.items():
        if name in _MODE_ARG:
            block = _mode_block(_MODE_ARG[name])
        elif name in _MKNOD_ARG:
            block = _mknod_block(_MKNOD_ARG[name])
        elif name == "renameat2":
            block = _rename_block()
        else:
            block = [_deny(_DENIED[name])]
        program.append((_JEQ, 0, len(block), number))
        program += block
    program.append(_ret(_ALLOW))
    return b"".join(struct.pack("<HBBI", *insn) for insn in program)


_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def seccomp_preexec() -> Callable[[], None]:
    """A ``preexec_fn`` part that installs the filter in the child (after ``PR_SET_NO_NEW_PRIVS``).
    Everything is allocated here, before ``fork``; the child only makes two ``prctl`` calls. It is
    inherited by everything the child runs: ``unshare``, the wrapper shell, virtiofsd."""
    program = filter_program()
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.cast(buffer, ctypes.c_void_p))
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    prctl = libc.prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    pinned = (buffer, fprog)  # the closure keeps both alive until the child has used them

    def install() -> None:
        if prctl(_PR_SET_NO_NEW_PRIVS, 1, None, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS failed")
        address = ctypes.addressof(pinned[1])
        if prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, address, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "installing the seccomp filter failed")

    return install
