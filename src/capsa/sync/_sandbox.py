"""Blocking twins of ``capsa.sandbox()`` and :class:`capsa.Sandbox`."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from functools import partial
from pathlib import Path
from typing import Any

from capsa._guardian import new_vm_dir
from capsa._portal import Portal
from capsa.errors import ConfigError
from capsa.image.custom import Image
from capsa.net.gateway import VirtualNetwork
from capsa.sandbox.builder import DEFAULT_BUILD_TIMEOUT, SandboxBuilder, SandboxConfig
from capsa.sandbox.builder import sandbox as _async_sandbox
from capsa.sandbox.handle import DEFAULT_SNAPSHOT_TIMEOUT, Sandbox, restore_sandbox
from capsa.shares.spec import AccessMode, Mechanism
from capsa.snapshot.store import Snapshot, remove_snapshot
from capsa.sync._agent import SyncAgent
from capsa.sync._vm import SyncVM, _on_loop


class SyncSandbox(SyncVM):
    """Blocking twin of :class:`capsa.Sandbox`; ``with`` powers it off on exit."""

    def __init__(self, portal: Portal, vm: Sandbox) -> None:
        super().__init__(portal, vm)
        self.agent = SyncAgent(portal, vm.agent)

    def __enter__(self) -> SyncSandbox:
        return self

    @property
    def _sandbox(self) -> Sandbox:
        vm = self._vm
        assert isinstance(vm, Sandbox)
        return vm

    def snapshot(self, path: str | Path, timeout: float = DEFAULT_SNAPSHOT_TIMEOUT) -> Snapshot:
        return self._portal.call(self._sandbox.snapshot(path, timeout))

    def fork(self, count: int = 1, timeout: float = DEFAULT_SNAPSHOT_TIMEOUT) -> list[SyncSandbox]:
        """Each clone gets its own event-loop thread, like any other sync handle."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ConfigError(f"fork count must be a positive integer, got {count!r}")
        network = self._sandbox._clone_network()
        scratch = new_vm_dir("fork-")
        try:
            snap = self.snapshot(scratch / "snapshot", timeout)
            clones: list[SyncSandbox] = []
            try:
                for ip in self._sandbox._fork_addresses(count):
                    clone = _start(partial(restore_sandbox, snap, timeout, (), network, ip))
                    clones.append(clone)
                    # the parent's deadline, armed on the clone's own loop (see Sandbox.fork)
                    clone._portal.call(
                        _on_loop(partial(self._sandbox._pass_lifetime_to, clone._sandbox))
                    )
            except BaseException:
                for clone in clones:
                    clone.kill()
                raise
            return clones
        finally:
            remove_snapshot(scratch)


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

    def network(self, network: VirtualNetwork) -> SyncSandboxBuilder:
        return self._wrap(self._builder.network(network))

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

    def lifetime(self, seconds: float) -> SyncSandboxBuilder:
        return self._wrap(self._builder.lifetime(seconds))

    def image(self, image: Image) -> SyncSandboxBuilder:
        return self._wrap(self._builder.image(image))

    def accelerator(self, name: str) -> SyncSandboxBuilder:
        return self._wrap(self._builder.accelerator(name))

    def name(self, name: str) -> SyncSandboxBuilder:
        return self._wrap(self._builder.name(name))

    def cold(self) -> SyncSandboxBuilder:
        return self._wrap(self._builder.cold())

    def from_snapshot(self, snapshot: str | Path | Snapshot) -> SyncSandboxBuilder:
        return self._wrap(self._builder.from_snapshot(snapshot))

    def build(self, timeout: float = DEFAULT_BUILD_TIMEOUT) -> SyncSandbox:
        return _start(lambda: self._builder.build(timeout))

    def __enter__(self) -> SyncSandbox:
        self._vm = self.build()
        return self._vm

    def __exit__(self, *exc_info: Any) -> None:
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
