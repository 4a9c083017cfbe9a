"""Blocking twins of ``capsa.vm()`` and :class:`capsa.VM`."""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from capsa._portal import Portal
from capsa.boot import BootConfig
from capsa.console import Console, Pattern
from capsa.net.forward import ForwardedPort
from capsa.net.gateway import VirtualNetwork
from capsa.net.stack import LogEntry, NetworkStack
from capsa.shares.spec import AccessMode, Mechanism, Share
from capsa.vm.builder import VMBuilder
from capsa.vm.builder import vm as _async_vm
from capsa.vm.config import DiskFormat, VMConfig, validate_lifetime
from capsa.vm.handle import DEFAULT_STOP_TIMEOUT, VM
from capsa.vm.runstate import RunState

T = TypeVar("T")


class SyncConsole:
    """Blocking twin of :class:`capsa.Console`."""

    def __init__(self, portal: Portal, console: Console) -> None:
        self._portal = portal
        self._console = console

    def wait_for(self, pattern: Pattern, timeout: float = 30.0) -> str:
        return self._portal.call(self._console.wait_for(pattern, timeout))

    def wait_for_any(self, patterns: Sequence[Pattern], timeout: float = 30.0) -> tuple[int, str]:
        return self._portal.call(self._console.wait_for_any(patterns, timeout))

    def read_available(self, timeout: float = 0.05) -> str:
        return self._portal.call(self._console.read_available(timeout))

    def write(self, data: str | bytes, timeout: float = 10.0) -> None:
        self._portal.call(self._console.write(data, timeout))

    def write_line(self, line: str, timeout: float = 10.0) -> None:
        self._portal.call(self._console.write_line(line, timeout))

    def send_interrupt(self) -> None:
        self._portal.call(self._console.send_interrupt())

    def exec_line(self, command: str, timeout: float = 30.0) -> str:
        return self._portal.call(self._console.exec_line(command, timeout))

    def tail(self, max_lines: int = 30) -> str:
        return self._console.tail(max_lines)


async def _on_loop(read: Callable[[], T]) -> T:
    return read()


class SyncNetwork:
    """Blocking view of a VM's :class:`~capsa.net.stack.NetworkStack` (read on its loop thread,
    where the stack changes)."""

    def __init__(self, portal: Portal, stack: NetworkStack) -> None:
        self._portal = portal
        self._stack = stack

    def log(self) -> list[LogEntry]:
        return self._portal.call(_on_loop(self._stack.log))

    def forwards(self) -> list[ForwardedPort]:
        return self._portal.call(_on_loop(self._stack.forwards))


class SyncVM:
    """Blocking twin of :class:`capsa.VM`. ``with`` stops it on exit."""

    def __init__(self, portal: Portal, vm: VM) -> None:
        self._portal = portal
        self._vm = vm
        self.console = SyncConsole(portal, vm.console)

    @property
    def status(self) -> RunState:
        return self._vm.status

    @property
    def accelerator(self) -> str:
        return self._vm.accelerator

    @property
    def log_dir(self) -> Path:
        return self._vm.log_dir

    @property
    def shares(self) -> list[Share]:
        return self._vm.shares

    @property
    def network(self) -> SyncNetwork:
        return SyncNetwork(self._portal, self._vm.network)

    @property
    def exit_code(self) -> int | None:
        return self._vm.exit_code

    @property
    def shutdown_reason(self) -> str | None:
        return self._vm.shutdown_reason

    @property
    def lifetime_remaining(self) -> float | None:
        return self._vm.lifetime_remaining

    @property
    def lifetime_expired(self) -> bool:
        return self._vm.lifetime_expired

    def set_lifetime(self, seconds: float) -> None:
        validate_lifetime(seconds)  # a bad value fails here, even on a closed handle
        if self._portal.closed:
            self._vm.set_lifetime(seconds)  # raises: stopped (or its lifetime expired)
        self._portal.call(_on_loop(lambda: self._vm.set_lifetime(seconds)))

    def port_socket(self, name: str) -> socket.socket:
        return self._vm.port_socket(name)

    def wait_for_state(self, *states: RunState, timeout: float | None = None) -> RunState:
        if self._portal.closed and self._vm.status in states:  # stopped: the state is final
            return self._vm.status
        return self._portal.call(self._vm.wait_for_state(*states, timeout=timeout))

    def wait(self, timeout: float | None = None) -> int:
        code = self._portal.call(self._vm.wait(timeout))
        self._portal.close()
        return code

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
        if not self._portal.closed:
            self._portal.call(self._vm.stop(timeout))
            self._portal.close()

    def kill(self) -> None:
        if not self._portal.closed:
            self._portal.call(self._vm.kill())
            self._portal.close()

    def __enter__(self) -> SyncVM:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class SyncVMBuilder:
    """Blocking twin of :class:`capsa.VMBuilder` (same immutable chaining)."""

    def __init__(self, builder: VMBuilder) -> None:
        self._builder = builder

    @property
    def config(self) -> VMConfig:
        return self._builder.config

    def _wrap(self, builder: VMBuilder) -> SyncVMBuilder:
        return SyncVMBuilder(builder)

    def lifetime(self, seconds: float) -> SyncVMBuilder:
        return self._wrap(self._builder.lifetime(seconds))

    def cpus(self, count: int) -> SyncVMBuilder:
        return self._wrap(self._builder.cpus(count))

    def memory_mb(self, megabytes: int) -> SyncVMBuilder:
        return self._wrap(self._builder.memory_mb(megabytes))

    def cmdline_arg(self, key: str, value: str) -> SyncVMBuilder:
        return self._wrap(self._builder.cmdline_arg(key, value))

    def cmdline_flag(self, flag: str) -> SyncVMBuilder:
        return self._wrap(self._builder.cmdline_flag(flag))

    def cmdline_override(self, cmdline: str) -> SyncVMBuilder:
        return self._wrap(self._builder.cmdline_override(cmdline))

    def disk(
        self, path: str | Path, *, read_only: bool = False, format: DiskFormat | None = None
    ) -> SyncVMBuilder:
        return self._wrap(self._builder.disk(path, read_only=read_only, format=format))

    def accelerator(self, name: str) -> SyncVMBuilder:
        return self._wrap(self._builder.accelerator(name))

    def machine(self, name: str) -> SyncVMBuilder:
        return self._wrap(self._builder.machine(name))

    def virtio_port(self, name: str) -> SyncVMBuilder:
        return self._wrap(self._builder.virtio_port(name))

    def share(
        self,
        host_path: str | Path,
        guest_path: str,
        mode: AccessMode = AccessMode.READ_ONLY,
        *,
        mechanism: Mechanism = "auto",
    ) -> SyncVMBuilder:
        return self._wrap(self._builder.share(host_path, guest_path, mode, mechanism=mechanism))

    def network(self, network: VirtualNetwork) -> SyncVMBuilder:
        return self._wrap(self._builder.network(network))

    def qemu_args(self, *args: str) -> SyncVMBuilder:
        return self._wrap(self._builder.qemu_args(*args))

    def name(self, name: str) -> SyncVMBuilder:
        return self._wrap(self._builder.name(name))

    def build(self, timeout: float = 30.0) -> SyncVM:
        portal = Portal()
        try:
            vm = portal.call(self._builder.build(timeout))
        except BaseException:
            portal.close()
            raise
        return SyncVM(portal, vm)

    def __enter__(self) -> SyncVM:
        self._vm = self.build()
        return self._vm

    def __exit__(self, *exc_info: Any) -> None:
        self._vm.stop()


def vm(boot: BootConfig) -> SyncVMBuilder:
    """Blocking twin of :func:`capsa.vm`."""
    return SyncVMBuilder(_async_vm(boot))
