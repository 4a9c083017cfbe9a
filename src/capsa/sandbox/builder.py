"""``capsa.sandbox()``: an immutable builder for sandboxes (a VM running capsa's guest agent)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from capsa._context import BuildsOnEnter
from capsa._paths import cache_dir
from capsa.accelerator import resolve_accelerator
from capsa.backend.qemu.process import find_qemu
from capsa.boot import LinuxDirectBoot
from capsa.errors import ConfigError, ExecFailedError, ImageError, SnapshotError, VolumeError
from capsa.image.custom import ImageSource
from capsa.image.sandbox import SandboxImage, sandbox_image
from capsa.net.gateway import VirtualNetwork
from capsa.sandbox.handle import AGENT_PORT, Sandbox, restore_sandbox
from capsa.shares.spec import (
    AccessMode,
    Mechanism,
    ShareSpec,
    check_mount_point,
    check_shares,
    for_template,
    make_share,
)
from capsa.snapshot.store import (
    Snapshot,
    check_compatible,
    config_key,
    config_record,
    load_snapshot,
    remove_snapshot,
)
from capsa.vm.config import (
    Accelerator,
    DiskSpec,
    VMConfig,
    validate_lifetime,
)
from capsa.vm.handle import start_lifetime
from capsa.vm.options import CommonOptions
from capsa.volume.spec import VolumeMount, check_mounts, serial
from capsa.volume.store import Volume

log = logging.getLogger(__name__)

DEFAULT_BUILD_TIMEOUT = 120.0
DEFAULT_WARMUP_TIMEOUT = 600.0


@dataclass(frozen=True)
class SandboxConfig:
    cpus: int = 1
    memory_mb: int = 512
    kernel: Path | None = None
    initrd: Path | None = None
    rootfs: Path | None = None
    accelerator: Accelerator = "auto"
    name: str | None = None
    shares: tuple[ShareSpec, ...] = ()
    cold: bool = False
    snapshot: Path | None = None
    network: VirtualNetwork | None = None
    lifetime: float | None = None  # seconds from build() (from take() for a pool) to stop-and-remove
    image: ImageSource | None = None  # a user image (capsa.Image): commands run in its root
    warmup: str | None = None  # a shell command run once before the template is recorded
    warmup_timeout: float = DEFAULT_WARMUP_TIMEOUT
    volumes: tuple[VolumeMount, ...] = ()


def _existing_file(path: str | Path, what: str) -> Path:
    resolved = Path(path).expanduser()
    if not resolved.is_file():
        raise ConfigError(f"{what} not found: {resolved}")
    return resolved


class SandboxBuilder(CommonOptions, BuildsOnEnter[Sandbox]):
    """Each method returns a new builder. ``await builder.build()`` returns once the agent answered;
    ``async with capsa.sandbox() as vm:`` builds, then stops the sandbox on exit."""

    def __init__(self, config: SandboxConfig | None = None) -> None:
        self._config = config or SandboxConfig()

    @property
    def config(self) -> SandboxConfig:
        return self._config

    def _with(self, **changes: Any) -> SandboxBuilder:
        return SandboxBuilder(replace(self._config, **changes))

    def no_network(self) -> SandboxBuilder:
        """No network device at all (the default)."""
        return self._with(network=None)

    def network(self, network: VirtualNetwork) -> SandboxBuilder:
        """A NIC behind capsa's userspace NAT, configured before the agent starts; egress follows the
        gateway's policy (``VirtualNetwork()`` alone allows everything)."""
        if not isinstance(network, VirtualNetwork):
            raise ConfigError("network() takes a VirtualNetwork")
        return self._with(network=network)

    def kernel(self, path: str | Path) -> SandboxBuilder:
        """Boot this kernel instead of the default one. It needs virtio (mmio/pci), blk, console,
        squashfs and overlay, built in or as modules of the initrd."""
        return self._with(kernel=_existing_file(path, "kernel"))

    def initrd(self, path: str | Path) -> SandboxBuilder:
        """Use this initramfs; it must mount the root and start the agent as capsa's does."""
        return self._with(initrd=_existing_file(path, "initrd"))

    def rootfs(self, path: str | Path) -> SandboxBuilder:
        """Use this root filesystem image (SquashFS, attached read-only); it needs python3 and
        python3-msgpack."""
        return self._with(rootfs=_existing_file(path, "rootfs"))

    def image(self, image: ImageSource) -> SandboxBuilder:
        """Run commands and file operations in ``image`` (``capsa.Image.from_oci(...)``), built
        (or found in the cache) at ``build()``, before the boot timeout starts. The agent keeps
        capsa's own root, so the image needs no Python."""
        if not isinstance(image, ImageSource):
            raise ConfigError("image() takes a capsa.Image")
        return self._with(image=image)

    def warmup(self, command: str, *, timeout: float = DEFAULT_WARMUP_TIMEOUT) -> SandboxBuilder:
        """Run the shell command ``command`` once after the first (cold) boot, before the template
        is recorded, so what it loads is in the page cache of every restore. The command is part of
        the template's key; a non-zero exit fails ``build()`` with :class:`ImageError`."""
        if not isinstance(command, str) or not command.strip() or "\0" in command:
            raise ConfigError("warmup() takes a non-empty shell command")
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
            raise ConfigError(f"warmup timeout must be a positive number of seconds, got {timeout!r}")
        return self._with(warmup=command, warmup_timeout=float(timeout))

    def share(
        self,
        host_path: str | Path,
        guest_path: str,
        mode: AccessMode = AccessMode.READ_ONLY,
        *,
        mechanism: Mechanism = "auto",
    ) -> SandboxBuilder:
        """Share a host directory; it is mounted at ``guest_path`` before ``build()`` returns.
        READ_ONLY is enforced on the host (guest root cannot remount it writable). ``auto`` uses 9p
        so the sandbox restores from a template (virtio-fs with ``cold()``); docs/shares.md."""
        spec = make_share(host_path, guest_path, mode, mechanism)
        if any(m.guest_path == spec.guest_path for m in self._config.volumes):
            raise ConfigError(f"share: a volume already uses the guest path {spec.guest_path}")
        shares = (*self._config.shares, spec)
        check_shares(shares)
        return self._with(shares=shares)

    def volume(self, volume: Volume, guest_path: str, *, read_only: bool = False) -> SandboxBuilder:
        """Mount ``volume`` (from ``capsa.volume(name)``) at ``guest_path`` before ``build()``
        returns: read-write by this sandbox alone, or ``read_only`` by any number of sandboxes.
        The sandbox boots cold (a template cannot hold another sandbox's disk); docs/volumes.md."""
        if not isinstance(volume, Volume):
            raise VolumeError("volume() takes a capsa.volume(name)")
        try:
            path = check_mount_point(guest_path)
        except ConfigError as exc:
            raise VolumeError(exc.message.replace("share:", "volume:"), name=volume.name) from None
        if any(share.guest_path == path for share in self._config.shares):
            raise VolumeError(f"volume: a share already uses the guest path {path}", name=volume.name)
        mounts = (*self._config.volumes, VolumeMount(volume, path, bool(read_only)))
        check_mounts(mounts)
        return self._with(volumes=mounts)

    def cold(self) -> SandboxBuilder:
        """Boot from scratch instead of restoring the cached template of this configuration."""
        return self._with(cold=True)

    def from_snapshot(self, snapshot: str | Path | Snapshot) -> SandboxBuilder:
        """Restore ``snapshot`` (from ``vm.snapshot(path)``) instead of booting; its configuration
        (image, cpus, memory) is the one that was saved."""
        path = snapshot.path if isinstance(snapshot, Snapshot) else Path(snapshot).expanduser()
        return self._with(snapshot=path)

    def lifetime(self, seconds: float) -> SandboxBuilder:
        """Stop and remove the sandbox ``seconds`` after ``build()`` returns (for a pool: after
        ``take()``); from then on every call on it raises ``VMNotRunning`` saying its lifetime
        expired. ``vm.set_lifetime(s)`` extends or shortens it while it runs."""
        return self._with(lifetime=validate_lifetime(seconds))

    async def _image(self) -> tuple[Path, Path, Path]:
        c = self._config
        if c.kernel and c.initrd and c.rootfs:
            return c.kernel, c.initrd, c.rootfs
        image = await asyncio.to_thread(_default_image)
        return c.kernel or image.kernel, c.initrd or image.initrd, c.rootfs or image.rootfs

    async def _kernel_has_9p(self) -> bool:
        """capsa's own kernel has 9p built in; Debian's cloud kernel (the fallback) and a kernel of
        the user's may not, so their ``auto`` shares stay on virtio-fs."""
        if self._config.kernel is not None:
            return False
        image = await asyncio.to_thread(_default_image)
        return image.kernel_kind == "capsa"

    async def vm_config(self) -> VMConfig:
        """The raw VM configuration this sandbox runs as (resolving the default image)."""
        kernel, initrd, rootfs = await self._image()
        boot = LinuxDirectBoot(kernel, initrd).with_root_disk(rootfs, read_only=True)
        c = self._config
        cmdline: tuple[tuple[str, str | None], ...] = (("quiet", None),)
        disks: tuple[DiskSpec, ...] = ()
        if c.image is not None:
            built = await asyncio.to_thread(
                c.image.build, progress=lambda step: log.warning("image: %s", step)
            )
            disks = tuple(DiskSpec(layer, read_only=True) for layer in built.layers)
            cmdline += (("capsa.image", str(len(built.layers))),)
        disks += tuple(
            DiskSpec(m.volume.path, m.read_only, "raw", serial(i), volume=True)
            for i, m in enumerate(c.volumes)
        )
        if c.warmup is not None:  # only to key the template: the guest ignores it
            cmdline += (("capsa.warmup", hashlib.sha256(c.warmup.encode()).hexdigest()[:16]),)
        if c.network is not None:
            gw = c.network.gateway
            address = f"{gw.guest_ip}/{gw.network.prefixlen},{gw.gateway_ip}"
            cmdline += (("capsa.ip", address),)
        return VMConfig(
            boot=boot,
            cpus=c.cpus,
            memory_mb=c.memory_mb,
            cmdline=cmdline,
            network=c.network,
            accelerator=c.accelerator,
            name=c.name,
            virtio_ports=(AGENT_PORT,),
            shares=c.shares,
            disks=disks,
        )

    async def build(self, timeout: float = DEFAULT_BUILD_TIMEOUT) -> Sandbox:
        """Return a running sandbox once its agent has answered (``timeout`` in seconds).

        The first build of a configuration boots cold and records a template snapshot; later builds
        restore that template (tens of times faster), unless ``cold()`` is set or a share is on
        virtio-fs (``mechanism="virtiofs"``, or a writable ``auto`` share on a host filesystem without
        user xattrs): ``auto`` shares go on 9p here, see docs/shares.md."""
        vm = await self._build(timeout)
        if self._config.lifetime is not None:
            await start_lifetime(vm, self._config.lifetime)
        return vm

    async def _build(self, timeout: float) -> Sandbox:
        c = self._config
        if c.network is not None and c.network.gateway.secrets:
            from capsa.net.secrets import check_secrets  # noqa: PLC0415

            gateway = c.network.gateway
            check_secrets(gateway.secrets, gateway.policy_value)  # before anything starts
        templated = c.shares
        if c.shares and await self._kernel_has_9p():
            templated = tuple(for_template(share) for share in c.shares)  # see docs/shares.md
        if c.snapshot is not None:
            return await restore_sandbox(load_snapshot(c.snapshot), timeout, templated, c.network)
        config = await self.vm_config()
        warmup = (c.warmup, c.warmup_timeout) if c.warmup is not None else None
        if c.cold or c.volumes or any(share.mechanism != "9p" for share in templated):
            # virtio-fs cannot be migrated, and a template cannot hold a volume: no template
            vm = await _cold(config, timeout, volumes=_guest_mounts(c.volumes))
            await _warm(vm, warmup)
            return vm
        return await _from_template(replace(config, shares=templated), timeout, warmup)


def _guest_mounts(mounts: tuple[VolumeMount, ...]) -> tuple[tuple[str, str, bool], ...]:
    """(serial, guest path, read-only) of each volume, as the sandbox mounts them after boot."""
    return tuple((serial(i), m.guest_path, m.read_only) for i, m in enumerate(mounts))


async def _cold(
    config: VMConfig,
    timeout: float,
    *,
    mount: bool = True,
    volumes: tuple[tuple[str, str, bool], ...] = (),
) -> Sandbox:
    vm = Sandbox(config, volumes=volumes)
    await vm._boot(timeout, mount=mount)
    return vm


def template_root() -> Path:
    return cache_dir() / "templates"


async def _warm(vm: Sandbox, warmup: tuple[str, float] | None) -> None:
    """Run the builder's warmup command in a freshly booted sandbox (stopping it if that fails)."""
    if warmup is None:
        return
    command, timeout = warmup
    try:
        result = await vm.agent.exec("/bin/sh").args(["-c", command]).timeout(timeout).run()
    except BaseException:
        await vm.kill()
        raise
    try:
        result.check()
    except ExecFailedError as exc:
        await vm.kill()
        output = (result.stdout + result.stderr)[-4000:]
        raise ImageError(
            f"the warmup command exited with {result.exit_code}: {command}\n{output}",
            hint="fix the command given to warmup(); no template was recorded",
        ) from exc


async def _from_template(
    config: VMConfig, timeout: float, warmup: tuple[str, float] | None = None
) -> Sandbox:
    """Restore this configuration's template, or boot cold (run the warmup) and record one."""
    boot = config.boot
    assert isinstance(boot, LinuxDirectBoot)
    qemu = find_qemu()
    accelerator = await resolve_accelerator(config.accelerator, boot.kernel)
    directory = template_root() / config_key(config_record(config, qemu, accelerator))
    if directory.exists():
        try:
            return await restore_sandbox(
                load_snapshot(directory), timeout, config.shares, config.network
            )
        except SnapshotError as exc:
            log.warning(
                "template %s is unusable (%s); booting cold and recording it again",
                directory,
                exc.message,
            )
            remove_snapshot(directory)
    vm = await _cold(config, timeout, mount=False)  # 9p exports must be unmounted to migrate
    await _warm(vm, warmup)
    try:
        try:
            await vm.snapshot(directory)
        except SnapshotError as exc:  # e.g. another process recorded it meanwhile: not our problem
            log.info("template not recorded: %s", exc.message)
        except OSError as exc:
            log.warning("template not recorded (%s); the next build boots cold again", exc)
        await vm._mount_shares()
        await vm._arm_secrets()  # after the snapshot: a template holds no sandbox's CA
    except BaseException:
        await vm.kill()
        raise
    _prune_stale_templates(qemu)
    return vm


def _prune_stale_templates(qemu: str) -> None:
    """Templates of an image or QEMU that changed can never restore again: drop them (tens of MB),
    and half-written ones whose process died (killed while recording)."""
    for other in template_root().iterdir():
        if other.name.startswith("."):
            _, _, pid = other.name.rpartition(".partial-")
            if pid.isdigit() and not _alive(int(pid)):
                log.info("removing %s, left by a process that died while recording it", other)
                remove_snapshot(other)
            continue
        try:
            check_compatible(load_snapshot(other), qemu)
        except SnapshotError:
            log.info("removing stale template %s", other)
            remove_snapshot(other)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _default_image() -> SandboxImage:
    try:
        return sandbox_image(build=False)
    except ImageError:
        log.warning("building the default sandbox image (first use; about a minute)")
    return sandbox_image(build=True, progress=lambda step: log.warning("image: %s", step))


def sandbox() -> SandboxBuilder:
    """Start describing a sandbox: zero configuration gives a Debian guest with python3."""
    return SandboxBuilder()


async def boot_sandbox(config: VMConfig, timeout: float) -> Sandbox:
    """Boot a sandbox from a raw VM configuration, without a template: the friend interface of
    image building (:mod:`capsa.recipes.run`), whose build VMs get different disks each time."""
    return await _cold(config, timeout)
