"""Blocking faces of ``capsa.vm()`` and :class:`capsa.VM`, derived from the async classes (see
:mod:`capsa.sync._derive`); what differs from them is written here."""

from __future__ import annotations

from types import TracebackType
from typing import Any

from capsa._portal import Portal
from capsa.boot import BootConfig
from capsa.console import Console
from capsa.net.stack import NetworkStack
from capsa.sync._derive import Face
from capsa.sync._signatures import (
    SyncConsoleMethods,
    SyncNetworkMethods,
    SyncVMBuilderMethods,
    SyncVMMethods,
)
from capsa.vm.builder import VMBuilder
from capsa.vm.builder import vm as _async_vm
from capsa.vm.config import validate_lifetime
from capsa.vm.handle import DEFAULT_STOP_TIMEOUT, VM
from capsa.vm.runstate import RunState


class SyncConsole(Face, SyncConsoleMethods, twin=Console):
    """Blocking face of :class:`capsa.Console`."""


# The stack's own plumbing: the VM drives it, a user never calls it.
_STACK_PLUMBING = {
    name: "the VM's own plumbing"
    for name in ("start", "close", "send_frame", "send_ip", "on_gateway_frame", "record")
}


class SyncNetwork(Face, SyncNetworkMethods, twin=NetworkStack, skip=_STACK_PLUMBING):
    """Blocking face of a VM's :class:`~capsa.net.stack.NetworkStack` (read on its loop thread,
    where the stack changes): ``vm.network.log()``, ``vm.network.forwards()``..."""


class SyncVM(Face, SyncVMMethods[SyncConsole, SyncNetwork], twin=VM):
    """Blocking face of :class:`capsa.VM`. ``with`` stops it on exit.

    A handle from ``build()`` owns its event-loop thread and closes it once the VM is stopped; a
    cluster's members share the cluster's thread, which the cluster closes."""

    def __init__(self, portal: Portal, vm: VM, *, owner: bool = True) -> None:
        super().__init__(portal, vm)
        self._owner = owner

    @classmethod
    def _adopt(cls, portal: Portal | None, target: Any) -> SyncVM:
        assert portal is not None
        return cls(portal, target, owner=False)

    @property
    def _vm(self) -> VM:
        vm = self._target
        assert isinstance(vm, VM)
        return vm

    @property
    def _loop_thread(self) -> Portal:
        assert self._portal is not None
        return self._portal

    def _release(self) -> None:
        if self._owner:
            self._loop_thread.close()

    def set_lifetime(self, seconds: float) -> None:
        validate_lifetime(seconds)  # a bad value fails here, even on a closed handle
        self._run(lambda: self._vm.set_lifetime(seconds))

    def wait_for_state(self, *states: RunState, timeout: float | None = None) -> RunState:
        if self._loop_thread.closed and self._vm.status in states:  # stopped: the state is final
            return self._vm.status
        return self._call(self._vm.wait_for_state(*states, timeout=timeout))

    def wait(self, timeout: float | None = None) -> int:
        code = self._call(self._vm.wait(timeout))
        self._release()
        return code

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
        if not self._loop_thread.closed:
            self._call(self._vm.stop(timeout))
            self._release()

    def kill(self) -> None:
        if not self._loop_thread.closed:
            self._call(self._vm.kill())
            self._release()

    def __enter__(self) -> SyncVM:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class SyncVMBuilder(Face, SyncVMBuilderMethods[SyncVM, "SyncVMBuilder"], twin=VMBuilder):
    """Blocking face of :class:`capsa.VMBuilder` (same immutable chaining)."""

    _plain_in_caller = True

    def __init__(self, builder: VMBuilder) -> None:
        super().__init__(None, builder)
        self._vm: SyncVM | None = None

    @classmethod
    def _adopt(cls, portal: Portal | None, target: Any) -> SyncVMBuilder:
        return cls(target)

    def build(self, timeout: float = 30.0) -> SyncVM:
        portal = Portal()
        try:
            vm = portal.call(self._target.build(timeout))
        except BaseException:
            portal.close()
            raise
        return SyncVM(portal, vm)

    def __enter__(self) -> SyncVM:
        self._vm = self.build()
        return self._vm

    def __exit__(self, *exc_info: object) -> None:
        if self._vm is not None:
            self._vm.stop()


def vm(boot: BootConfig) -> SyncVMBuilder:
    """Blocking twin of :func:`capsa.vm`."""
    return SyncVMBuilder(_async_vm(boot))
