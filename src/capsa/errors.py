"""Every exception capsa raises, in one place.

All derive from :class:`CapsaError`. Each carries the data needed to debug it (the console tail, the
QEMU log tail, an exit status) as attributes, plus a ``hint`` that says how to fix it::

    CapsaError
    ├── ConfigError (also ValueError)       bad builder value, missing kernel, QEMU not installed
    ├── ImageError                          building or fetching a guest image failed
    ├── BackendError                        QEMU refused to start or died (``qemu_log_tail``)
    ├── VMNotRunning                        the VM is stopped, or was never started
    │   ├── VMExited                        the guest powered off / QEMU exited while we waited
    │   └── VMStateError                    the call needs another state (``state``, ``required``)
    ├── ProtocolError                       a guest sent bytes that break the protocol
    ├── ShareError                          a shared directory's server failed (``log_tail``)
    ├── SnapshotError                       a snapshot could not be saved, read or restored
    ├── VolumeError                         a volume is missing, in use, full or malformed (``name``)
    ├── SandboxLost                         a remote sandbox's node or host actor died (``node_id``)
    ├── AgentError                          the guest agent refused or failed a request
    │   ├── ExecOutputLimitError            a command printed more than ``run()`` keeps
    │   └── GuestFileError                  a guest path operation failed (``path``, ``errno``)
    │       ├── GuestFileNotFoundError      no such file, directory or program
    │       ├── GuestPermissionError        EACCES / EPERM / read-only filesystem
    │       └── GuestFileExistsError        mkdir of an existing path
    └── CapsaTimeoutError (also TimeoutError)
        ├── ConsoleTimeoutError             a console pattern did not appear in time
        ├── StartTimeoutError               a sandbox's agent did not answer in time
        └── ExecTimeoutError                a guest command ran past its timeout (partial output)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from capsa.vm.runstate import RunState


class CapsaError(Exception):
    """Root of capsa's errors. ``hint`` says what the user can do about it."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        text = self.message
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text


class ConfigError(CapsaError, ValueError):
    """A configuration value is invalid (raised by a builder call or by ``build()``)."""


class ImageError(CapsaError):
    """A kernel, initramfs or root filesystem could not be fetched, built or read."""


def _tail_block(title: str, tail: str) -> str:
    if not tail:
        return ""
    return f"\n--- {title} ---\n{tail.rstrip()}\n---"


class BackendError(CapsaError):
    """QEMU failed to start, refused a command, or died unexpectedly."""

    def __init__(self, message: str, *, qemu_log_tail: str = "", hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.qemu_log_tail = qemu_log_tail

    def __str__(self) -> str:
        return super().__str__() + _tail_block("QEMU log (tail)", self.qemu_log_tail)


class VMNotRunning(CapsaError):
    """The operation needs a running VM, but it is stopped, failed, or not started yet."""


class VMStateError(VMNotRunning):
    """The handle is not in a state the call allows: ``state`` is where it is, ``required`` the
    states the call needs. A :class:`VMNotRunning`, so ``except VMNotRunning`` catches it too."""

    def __init__(
        self,
        message: str,
        *,
        state: RunState,
        required: tuple[RunState, ...],
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.state = state
        self.required = required


class VMExited(VMNotRunning):
    """The VM exited while an operation waited on it (guest poweroff, panic, or QEMU crash)."""

    def __init__(
        self,
        message: str,
        *,
        exit_code: int | None,
        console_tail: str = "",
        qemu_log_tail: str = "",
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.exit_code = exit_code
        self.console_tail = console_tail
        self.qemu_log_tail = qemu_log_tail

    def __str__(self) -> str:
        return (
            super().__str__()
            + _tail_block("console (tail)", self.console_tail)
            + _tail_block("QEMU log (tail)", self.qemu_log_tail)
        )


class ProtocolError(CapsaError):
    """A guest sent bytes that violate the protocol (malformed, oversized or unexpected)."""


class ShareError(CapsaError):
    """A shared directory could not be served (virtiofsd failed to start or died)."""

    def __init__(
        self, message: str, *, host_path: object = None, log_tail: str = "", hint: str | None = None
    ) -> None:
        super().__init__(message, hint=hint)
        self.host_path = host_path
        self.log_tail = log_tail

    def __str__(self) -> str:
        return super().__str__() + _tail_block("virtiofsd log (tail)", self.log_tail)


class SnapshotError(CapsaError):
    """Saving, reading or restoring a snapshot failed; ``path`` names the snapshot."""

    def __init__(self, message: str, *, path: object = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.path = path


class VolumeError(CapsaError):
    """A volume could not be created, opened, attached, copied or removed (``name``)."""

    def __init__(self, message: str, *, name: str = "", hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.name = name


class SandboxLost(CapsaError):
    """A sandbox placed through :mod:`capsa.ray` is gone: its node or its host actor died (with every
    VM on it). ``node_id`` is Ray's hex node id. Calls are never retried behind your back (an exec is
    not idempotent): build a new sandbox, which lands on a node that is still alive."""

    def __init__(self, message: str, *, node_id: str = "", hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.node_id = node_id


class AgentError(CapsaError):
    """The guest agent answered a request with an error. ``kind`` is the agent's error kind (see
    :data:`capsa.agent.wire.ERROR_KINDS`); ``errno`` the guest errno when there is one."""

    def __init__(
        self, message: str, *, kind: str = "", errno: int | None = None, hint: str | None = None
    ) -> None:
        super().__init__(message, hint=hint)
        self.kind = kind
        self.errno = errno


class GuestFileError(AgentError):
    """An operation on a guest path failed; ``path`` names it."""

    def __init__(
        self,
        message: str,
        *,
        path: str,
        kind: str = "os_error",
        errno: int | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, kind=kind, errno=errno, hint=hint)
        self.path = path


class GuestFileNotFoundError(GuestFileError):
    """The guest path (or the program to run) does not exist."""


class GuestPermissionError(GuestFileError):
    """The guest refused access (permissions, or a read-only filesystem)."""


class GuestFileExistsError(GuestFileError):
    """The guest path already exists."""


class ExecOutputLimitError(AgentError):
    """``run()`` stopped a command whose output passed the limit; partial output is attached."""

    def __init__(self, message: str, *, stdout: bytes, stderr: bytes, hint: str | None = None) -> None:
        super().__init__(message, kind="output_limit", hint=hint)
        self.stdout = stdout
        self.stderr = stderr


class CapsaTimeoutError(CapsaError, TimeoutError):
    """An operation did not finish within its ``timeout``."""


class StartTimeoutError(CapsaTimeoutError):
    """A sandbox's agent did not answer in time; ``console_tail`` shows how far the guest got."""

    def __init__(self, message: str, *, console_tail: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.console_tail = console_tail

    def __str__(self) -> str:
        return super().__str__() + _tail_block("console (tail)", self.console_tail)


class ConsoleTimeoutError(CapsaTimeoutError):
    """``console.wait_for`` gave up; ``console_tail`` holds the last output the guest printed."""

    def __init__(
        self, message: str, *, pattern: str, console_tail: str, hint: str | None = None
    ) -> None:
        super().__init__(message, hint=hint)
        self.pattern = pattern
        self.console_tail = console_tail

    def __str__(self) -> str:
        return super().__str__() + _tail_block("console (tail)", self.console_tail)


class ExecTimeoutError(CapsaTimeoutError):
    """A guest command ran past its timeout and was killed. ``stdout``/``stderr`` hold what it printed
    before (bytes; decode as you need)."""

    def __init__(
        self,
        message: str,
        *,
        argv: list[str],
        timeout: float,
        stdout: bytes,
        stderr: bytes,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.argv = argv
        self.timeout = timeout
        self.stdout = stdout
        self.stderr = stderr


__all__ = [
    "AgentError",
    "BackendError",
    "CapsaError",
    "CapsaTimeoutError",
    "ConfigError",
    "ConsoleTimeoutError",
    "ExecOutputLimitError",
    "ExecTimeoutError",
    "GuestFileError",
    "GuestFileExistsError",
    "GuestFileNotFoundError",
    "GuestPermissionError",
    "ImageError",
    "ProtocolError",
    "SandboxLost",
    "ShareError",
    "SnapshotError",
    "StartTimeoutError",
    "VMExited",
    "VMNotRunning",
]
