"""Every exception capsa raises, in one place.

All derive from :class:`CapsaError`. Each carries the data needed to debug it (the console tail, the
QEMU log tail, an exit status) as attributes, plus a ``hint`` that says how to fix it::

    CapsaError
    ├── ConfigError (also ValueError)       bad builder value, missing kernel, QEMU not installed
    ├── ImageError                          building or fetching a guest image failed
    │   ├── StepError                       a recipe's run() step exited non-zero (``output``)
    │   └── CaptureError                    a build VM's output is not an archive capsa accepts
    ├── BackendError                        QEMU refused to start, a command or died
    │                                       (``qemu_log_tail``, QMP's ``qmp_class``, ``command``)
    ├── VMNotRunning                        the VM is stopped, or was never started
    │   ├── VMExited                        the guest powered off / QEMU exited while we waited
    │   └── VMStateError                    the call needs another state (``state``, ``required``)
    ├── ProtocolError                       a guest sent bytes that break the protocol
    ├── ShareError                          a shared directory's server failed (``log_tail``)
    ├── SnapshotError                       a snapshot could not be saved, read or restored
    ├── VolumeError                         a volume is missing, in use, full or malformed (``name``)
    ├── SandboxLost                         a remote sandbox's node or host actor died (``node_id``)
    ├── NoSlotError                         no Ray node had a free capsa slot in time (``nodes``)
    ├── ExecFailedError                     ``ExecResult.check()``: a command exited non-zero
    │                                       (``argv``, ``exit_code``, ``stdout``, ``stderr``)
    ├── AgentError                          the guest agent refused or failed a request
    │   ├── ExecOutputLimitError            a command printed more than ``run()`` keeps
    │   ├── ConnectionRefused               nothing listens on that guest port
    │   └── GuestFileError                  a guest path operation failed (``path``, ``errno``)
    │       ├── GuestFileNotFoundError      no such file, directory or program
    │       ├── GuestPermissionError        EACCES / EPERM / read-only filesystem
    │       └── GuestFileExistsError        mkdir of an existing path
    └── CapsaTimeoutError (also TimeoutError)
        ├── ConsoleTimeoutError             a console pattern did not appear in time
        ├── StartTimeoutError               a sandbox's agent did not answer in time
        └── ExecTimeoutError                a guest command ran past its timeout (partial output)

Defined elsewhere, on purpose:

- ``capsa.server``'s HTTP errors (``ApiError`` and its subclasses, ``ConnectError``,
  ``InterpreterError``, ``LimitReached``, ``IngressError``): CapsaErrors (``IngressError`` aside)
  that carry an HTTP status, turned into responses inside the server, never raised to library users.
- Internal signals that never leave their module (each is caught and turned into one of the errors
  above, or into a fallback): ``capsa.net.packets.PacketError`` (a malformed frame, dropped),
  ``capsa.snapshot.stream.UnsupportedStream`` (a migration stream layout the splitter does not know:
  the helper QEMU takes over), ``capsa.image.tarheader.TarError`` (wrapped as ImageError),
  ``capsa.image.mergetree.Repeated`` (a merge needs planning), ``capsa.agent.wire.WireError``
  (wrapped as ProtocolError), ``capsa.agent.exec._OutputLimit``.
- The guest agent's own (``capsa.agent.guest``: ``BadRequest``, ``StartupError``): it runs inside
  the guest and imports nothing of capsa but the wire format; they become error replies.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from capsa.runstate import RunState


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
    """QEMU failed to start, refused a command, or died unexpectedly. For a QMP command QEMU
    refused, ``command`` names it and ``qmp_class`` is QMP's error class (``GenericError``,
    ``DeviceNotFound``, ...); both are None otherwise."""

    def __init__(
        self,
        message: str,
        *,
        qemu_log_tail: str = "",
        command: str | None = None,
        qmp_class: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.qemu_log_tail = qemu_log_tail
        self.command = command
        self.qmp_class = qmp_class

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


class NoSlotError(CapsaError):
    """No Ray node with capsa slots (matching the builder's ``node(...)``) had a free slot in time;
    ``nodes`` lists ``(node_id, used, slots)`` as last seen."""

    def __init__(
        self, message: str, *, nodes: Sequence[tuple[str, int, int]] = (), hint: str | None = None
    ) -> None:
        super().__init__(message, hint=hint)
        self.nodes = list(nodes)


class CapacityError(CapsaError):
    """A new VM was refused before QEMU started because this host would run out of ``resource``
    (``"memory"`` or ``"open files"``): ``needed`` and ``available`` are in ``unit`` (MiB or fds)."""

    def __init__(
        self,
        message: str,
        *,
        resource: str,
        needed: int,
        available: int,
        unit: str,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.resource = resource
        self.needed = needed
        self.available = available
        self.unit = unit


class ExecFailedError(CapsaError):
    """A guest command exited non-zero where success was required (``ExecResult.check()``): its
    ``argv``, ``exit_code``, and ``stdout``/``stderr`` (decoded text), as asyncssh's
    ``ProcessError`` carries them."""

    def __init__(
        self,
        message: str,
        *,
        argv: Sequence[str],
        exit_code: int,
        stdout: str,
        stderr: str,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.argv = list(argv)
        self.exit_code = exit_code
        self.stdout = stdout
        self.stderr = stderr

    def __str__(self) -> str:
        return super().__str__() + _tail_block("stderr (tail)", self.stderr[-2000:])


class StepError(ImageError):
    """A ``run()`` step exited non-zero: ``command``, ``exit_code`` and its ``output`` (tail)."""

    def __init__(self, message: str, *, command: str, exit_code: int, output: str) -> None:
        super().__init__(
            message, hint="fix the command; the layers below it stay cached, nothing else was kept"
        )
        self.command = command
        self.exit_code = exit_code
        self.output = output

    def __str__(self) -> str:
        return f"{super().__str__()}\n--- output (tail) ---\n{self.output.rstrip()}\n---"


class CaptureError(ImageError):
    """The build VM's output is not an archive capsa accepts."""

    def __init__(self, message: str) -> None:
        super().__init__(
            f"the build VM's capture is refused: {message}",
            hint="the step's guest wrote something other than GNU tar's archive of its changes",
        )


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


class UnknownUserError(AgentError):
    """A command or file write asked for an account the guest does not have; ``user`` names it."""

    def __init__(self, message: str, *, user: str, hint: str | None = None) -> None:
        super().__init__(message, kind="unknown_user", hint=hint)
        self.user = user


class ExecOutputLimitError(AgentError):
    """``run()`` stopped a command whose output passed the limit; partial output is attached."""

    def __init__(self, message: str, *, stdout: bytes, stderr: bytes, hint: str | None = None) -> None:
        super().__init__(message, kind="output_limit", hint=hint)
        self.stdout = stdout
        self.stderr = stderr


class ConnectionRefused(AgentError):
    """Nothing listens on that guest port (or the guest refused the connection)."""


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
    "CapacityError",
    "CapsaError",
    "CapsaTimeoutError",
    "CaptureError",
    "ConfigError",
    "ConnectionRefused",
    "ConsoleTimeoutError",
    "ExecFailedError",
    "ExecOutputLimitError",
    "ExecTimeoutError",
    "GuestFileError",
    "GuestFileExistsError",
    "GuestFileNotFoundError",
    "GuestPermissionError",
    "ImageError",
    "NoSlotError",
    "ProtocolError",
    "SandboxLost",
    "ShareError",
    "SnapshotError",
    "StartTimeoutError",
    "StepError",
    "VMExited",
    "VMNotRunning",
]
