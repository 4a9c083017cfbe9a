"""Blocking twins of ``capsa.sandbox()`` and :class:`capsa.Sandbox`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from capsa._portal import Portal
from capsa.sandbox.builder import DEFAULT_BUILD_TIMEOUT, SandboxBuilder, SandboxConfig
from capsa.sandbox.builder import sandbox as _async_sandbox
from capsa.sandbox.handle import Sandbox
from capsa.shares.spec import AccessMode, Mechanism
from capsa.sync._agent import SyncAgent
from capsa.sync._vm import SyncVM


class SyncSandbox(SyncVM):
    """Blocking twin of :class:`capsa.Sandbox`; ``with`` powers it off on exit."""

    def __init__(self, portal: Portal, vm: Sandbox) -> None:
        super().__init__(portal, vm)
        self.agent = SyncAgent(portal, vm.agent)

    def __enter__(self) -> SyncSandbox:
        return self


class SyncSandboxBuilder:
    """Blocking twin of :class:`capsa.SandboxBuilder` (same immutable chaining)."""

    def __init__(self, builder: SandboxBuilder) -> None:
        self._builder = builder
        self._vm: SyncSandbox | None = None

    @property
    def config(self) -> SandboxConfig:
        return self._builder.config

    def _wrap(self, builder: SandboxBuilder) -> SyncSandboxBuilder:
        return SyncSandboxBuilder(builder)

    def cpus(self, count: int) -> SyncSandboxBuilder:
        return self._wrap(self._builder.cpus(count))

    def memory_mb(self, megabytes: int) -> SyncSandboxBuilder:
        return self._wrap(self._builder.memory_mb(megabytes))

    def no_network(self) -> SyncSandboxBuilder:
        return self._wrap(self._builder.no_network())

    def kernel(self, path: str | Path) -> SyncSandboxBuilder:
        return self._wrap(self._builder.kernel(path))

    def initrd(self, path: str | Path) -> SyncSandboxBuilder:
        return self._wrap(self._builder.initrd(path))

    def rootfs(self, path: str | Path) -> SyncSandboxBuilder:
        return self._wrap(self._builder.rootfs(path))

    def share(
        self,
        host_path: str | Path,
        guest_path: str,
        mode: AccessMode = AccessMode.READ_ONLY,
        *,
        mechanism: Mechanism = "auto",
    ) -> SyncSandboxBuilder:
        return self._wrap(self._builder.share(host_path, guest_path, mode, mechanism=mechanism))

    def accelerator(self, name: str) -> SyncSandboxBuilder:
        return self._wrap(self._builder.accelerator(name))

    def name(self, name: str) -> SyncSandboxBuilder:
        return self._wrap(self._builder.name(name))

    def build(self, timeout: float = DEFAULT_BUILD_TIMEOUT) -> SyncSandbox:
        portal = Portal()
        try:
            vm = portal.call(self._builder.build(timeout))
        except BaseException:
            portal.close()
            raise
        return SyncSandbox(portal, vm)

    def __enter__(self) -> SyncSandbox:
        self._vm = self.build()
        return self._vm

    def __exit__(self, *exc_info: Any) -> None:
        if self._vm is not None:
            self._vm.stop()


def sandbox() -> SyncSandboxBuilder:
    """Blocking twin of :func:`capsa.sandbox`."""
    return SyncSandboxBuilder(_async_sandbox())
