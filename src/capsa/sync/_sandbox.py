"""Blocking faces of ``capsa.sandbox()`` and :class:`capsa.Sandbox`, derived from the async classes
(see :mod:`capsa.sync._derive`); what differs from them is written here."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any

from capsa._guardian import new_vm_dir
from capsa._portal import Portal
from capsa.errors import ConfigError
from capsa.sandbox.builder import DEFAULT_BUILD_TIMEOUT, SandboxBuilder
from capsa.sandbox.builder import sandbox as _async_sandbox
from capsa.sandbox.handle import (
    DEFAULT_SNAPSHOT_TIMEOUT,
    Sandbox,
    fork_plan,
    pass_lifetime,
    restore_sandbox,
)
from capsa.snapshot.store import remove_snapshot
from capsa.sync._agent import SyncAgent
from capsa.sync._derive import Face, _on_loop
from capsa.sync._signatures import SyncSandboxBuilderMethods, SyncSandboxMethods
from capsa.sync._vm import SyncConsole, SyncNetwork, SyncVM


class SyncSandbox(
    SyncVM, SyncSandboxMethods[SyncAgent, SyncConsole, SyncNetwork, "SyncSandbox"], twin=Sandbox
):
    """Blocking face of :class:`capsa.Sandbox`; ``with`` powers it off on exit."""

    def __enter__(self) -> SyncSandbox:
        return self

    @property
    def _sandbox(self) -> Sandbox:
        vm = self._target
        assert isinstance(vm, Sandbox)
        return vm

    def fork(self, count: int = 1, timeout: float = DEFAULT_SNAPSHOT_TIMEOUT) -> list[SyncSandbox]:
        """Each clone gets its own event-loop thread, like any other sync handle."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ConfigError(f"fork count must be a positive integer, got {count!r}")
        network, addresses = fork_plan(self._sandbox, count)
        scratch = new_vm_dir("fork-")
        try:
            snap = self.snapshot(scratch / "snapshot", timeout)
            clones: list[SyncSandbox] = []
            try:
                for ip in addresses:
                    clone = _start(partial(restore_sandbox, snap, timeout, (), network, ip))
                    clones.append(clone)
                    # the parent's deadline, armed on the clone's own loop (see Sandbox.fork)
                    clone._call(_on_loop(partial(pass_lifetime, self._sandbox, clone._sandbox)))
            except BaseException:
                for clone in clones:
                    clone.kill()
                raise
            return clones
        finally:
            remove_snapshot(scratch)


class SyncSandboxBuilder(
    Face, SyncSandboxBuilderMethods[SyncSandbox, "SyncSandboxBuilder"], twin=SandboxBuilder
):
    """Blocking face of :class:`capsa.SandboxBuilder` (same immutable chaining)."""

    _plain_in_caller = True
    _target: SandboxBuilder

    def __init__(self, builder: SandboxBuilder) -> None:
        super().__init__(None, builder)
        self._vm: SyncSandbox | None = None

    @classmethod
    def _adopt(cls, portal: Portal | None, target: Any) -> SyncSandboxBuilder:
        return cls(target)

    def build(self, timeout: float = DEFAULT_BUILD_TIMEOUT) -> SyncSandbox:
        return _start(lambda: self._target.build(timeout))

    def __enter__(self) -> SyncSandbox:
        self._vm = self.build()
        return self._vm

    def __exit__(self, *exc_info: object) -> None:
        if self._vm is not None:
            self._vm.stop()


def _start(make: Callable[[], Coroutine[Any, Any, Sandbox]]) -> SyncSandbox:
    portal = Portal()
    try:
        vm = portal.call(make())
    except BaseException:
        portal.close()
        raise
    return SyncSandbox(portal, vm)


def sandbox() -> SyncSandboxBuilder:
    """Blocking twin of :func:`capsa.sandbox`."""
    return SyncSandboxBuilder(_async_sandbox())
