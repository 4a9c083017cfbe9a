"""A running sandbox: a VM whose guest runs capsa's agent, reachable as ``vm.agent``."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import logging
import random
import secrets
import time
from dataclasses import replace
from pathlib import Path

from capsa._guardian import new_vm_dir
from capsa._paths import free_bytes
from capsa.agent import wire
from capsa.agent.attach import resync
from capsa.agent.channel import Channel
from capsa.agent.client import Agent
from capsa.agent.errors import expect_ok
from capsa.backend.qemu.process import find_qemu
from capsa.errors import (
    BackendError,
    CapsaError,
    CapsaTimeoutError,
    ConfigError,
    ExecFailedError,
    ProtocolError,
    ShareError,
    SnapshotError,
    StartTimeoutError,
    VMExited,
    VMNotRunning,
    VolumeError,
)
from capsa.image.sandbox import INIT_ERROR_MARKER
from capsa.net.gateway import VirtualNetwork
from capsa.shares.spec import AccessMode, ShareSpec
from capsa.snapshot.memory import write_snapshot_files
from capsa.snapshot.migration import fsync, load_state, save_state
from capsa.snapshot.store import (
    STATE,
    Snapshot,
    check_compatible,
    config_record,
    load_snapshot,
    new_partial_dir,
    remove_snapshot,
    volume_identities,
    write_metadata,
)
from capsa.vm.config import VMConfig
from capsa.vm.handle import DEFAULT_STOP_TIMEOUT, VM
from capsa.volume.spec import MOUNT_SCRIPT, mount_options

log = logging.getLogger(__name__)

AGENT_PORT = "capsa.agent"
NINE_P_MSIZE = 512000  # 9p's default 8 KiB messages make large reads several times slower
_SHUTDOWN_ACK_TIMEOUT = 5.0
DEFAULT_SNAPSHOT_TIMEOUT = 120.0


class Sandbox(VM):
    """A VM with a guest agent. Create it with ``await capsa.sandbox().build()``; ``async with`` it
    (or ``await vm.stop()``) to power it off and clean up."""

    _KIND = "sandbox"

    def __init__(
        self,
        config: VMConfig,
        *,
        guest_ip: ipaddress.IPv4Address | None = None,
        volumes: tuple[tuple[str, str, bool], ...] = (),
    ) -> None:
        """``volumes``: (disk serial, guest path, read-only) of each volume to mount after a cold
        boot (a restored sandbox finds them mounted already, in its memory)."""
        super().__init__(config, guest_ip=guest_ip)
        self._volumes = volumes
        self._channel: Channel | None = None
        self._agent: Agent | None = None
        self.ready_seconds: float | None = None  # from build() to the agent's hello
        self._shares_mounted = False

    @property
    def agent(self) -> Agent:
        if self._agent is None:
            raise VMNotRunning("the sandbox's agent is not connected", hint="await build() first")
        return self._agent

    async def _boot(self, timeout: float, *, mount: bool = True) -> None:
        """Start QEMU, then wait until the agent has said hello (``timeout`` covers both); then mount
        the shares unless ``mount`` is false (the caller snapshots first, then mounts)."""
        started = time.monotonic()
        try:
            async with asyncio.timeout(timeout):
                await self._start(timeout)
                self._channel = Channel(self.port_socket(AGENT_PORT), self._agent_lost)
                await self._channel.start()
                hello = await self._channel.hello()
        except TimeoutError:
            tail = self._console.tail() if self._console else ""
            await self.kill()
            raise StartTimeoutError(
                f"the sandbox's agent did not answer within {timeout:.0f}s",
                console_tail=tail,
                hint="a slow host may need build(timeout=...); the console tail shows how far it got",
            ) from None
        except VMExited as exc:
            await self.kill()
            raise _explain_exit(exc) from None
        except BaseException:
            await self.kill()
            raise
        if hello.get("v") != wire.PROTOCOL_VERSION:
            await self.kill()
            raise ProtocolError(
                f"the guest agent speaks protocol {hello.get('v')!r:.20}, capsa speaks "
                f"{wire.PROTOCOL_VERSION}",
                hint="the initrd's agent comes from another capsa version; run: capsa image build",
            )
        self._agent = Agent(self._channel)
        try:
            async with asyncio.timeout(max(1.0, timeout - (time.monotonic() - started))):
                await self._agent.refresh(new_hostname())
                await self._mount_volumes()
                if mount:
                    await self._mount_shares()
                    await self._arm_secrets()
        except BaseException:
            await self.kill()
            raise
        self.ready_seconds = time.monotonic() - started
        log.info("sandbox agent ready after %.2fs", self.ready_seconds)

    async def _boot_from(self, snapshot: Snapshot, timeout: float) -> None:
        """Start QEMU waiting for a migration stream, load ``snapshot``, resume, and give the guest a
        new identity. Any failure kills the VM: never a half-restored sandbox."""
        started = time.monotonic()
        origin = _identity(snapshot)
        try:
            async with asyncio.timeout(timeout):
                await self._start(timeout, incoming=True)
                sync = secrets.token_bytes(16)  # the old host's half-conversation is skipped
                self._channel = Channel(self.port_socket(AGENT_PORT), self._agent_lost, sync=sync)
                await self._channel.start()
                assert self._monitor is not None
                await load_state(self._monitor, snapshot.state, timeout, ignore_shared=True)
                await self._resume_if_paused()
                await resync(self._channel, timeout)  # its processes wait, detached, for attach()
                agent = Agent(self._channel)
                identity = self._network.identity() if self._network is not None else None
                await agent.refresh(new_hostname(), identity)  # also the proof the agent answers
                self._agent = agent
                await self._mount_shares()
                if any(_covers(spec.guest_path, "/etc") for spec in self.config.shares):
                    origin = None  # a share over /etc: the guest's files are not the snapshot's
                await self._arm_secrets(origin)
        except TimeoutError:
            tail = self._process.log_tail() if self._process else ""
            await self.kill()
            raise SnapshotError(
                f"restoring {snapshot.path} did not finish within {timeout:.0f}s "
                f"(QEMU log: {tail[-500:]})",
                path=snapshot.path,
            ) from None
        except VMExited as exc:
            await self.kill()
            raise SnapshotError(
                f"restoring {snapshot.path} failed: QEMU exited ({exc.qemu_log_tail.strip()[-500:]})",
                path=snapshot.path,
                hint="the snapshot may be corrupt or from another capsa/QEMU version; take a new one",
            ) from None
        except BaseException:
            await self.kill()
            raise
        self._agent = agent
        self.ready_seconds = time.monotonic() - started
        log.info("sandbox restored from %s in %.3fs", snapshot.path, self.ready_seconds)

    async def _arm_secrets(self, origin: str | None = None) -> None:
        """With secrets on the gateway: the guest trusts this sandbox's CA and every exec gets the
        placeholders (docs/secrets.md). A fork shares its parent's, already in its guest.
        ``origin``: the identity of the snapshot the guest was just restored from."""
        network = self._network
        session = network.secret_session if network is not None else None
        if session is None or network is None:
            return
        from capsa.sandbox.secrets_guest import arm_secrets  # noqa: PLC0415

        shared = network.gateway.shared_session is session
        await arm_secrets(self.agent, session, install=not shared, timeout=30.0, origin=origin)

    async def _resume_if_paused(self) -> None:
        assert self._monitor is not None
        status = await self._monitor.execute("query-status")
        if isinstance(status, dict) and status.get("status") != "running":
            await self._monitor.execute("cont")

    async def snapshot(
        self, path: str | Path, timeout: float = DEFAULT_SNAPSHOT_TIMEOUT, *, resume: bool = True
    ) -> Snapshot:
        """Save this running sandbox to the directory ``path`` (created; it must not exist). The VM
        pauses while QEMU writes its memory (~0.1-0.5 s) and then keeps running, unless ``resume``
        is false: then, once the snapshot is saved, the VM stays frozen for the caller to stop (a
        pause; nothing runs past the snapshot, which keeps a read-write volume restorable).

        A read-write volume's image is recorded in the snapshot: if anything writes to the volume
        after it (the sandbox running on, another sandbox), restoring it is refused, since the
        restored kernel's view of the filesystem would no longer match the disk.

        Running processes are captured with the VM: here their handles go on working; in a sandbox
        restored from the snapshot (or a fork) they go on running, listed by
        ``agent.processes()`` and reached with ``agent.attach(pid)``, which delivers the output
        this host had not consumed when the snapshot was taken, then the rest. A request or file
        transfer in flight makes it raise :class:`SnapshotError` at once, naming them.
        """
        self._life.check()
        if self._shares and (self._shares_mounted or any(s.mechanism != "9p" for s in self._shares)):
            raise SnapshotError(
                "a sandbox with mounted shared directories cannot be snapshotted",
                hint="QEMU 7.2 cannot migrate virtio-fs or a mounted 9p export; snapshot without "
                "shares (templates of sandboxes with 9p shares are taken before they are mounted)",
            )
        process, monitor, channel = self._process, self._monitor, self._channel
        if process is None or monitor is None or channel is None or process.returncode is not None:
            raise VMNotRunning("only a running sandbox can be snapshotted")
        _check_idle(channel)
        await _quiesce(channel, timeout)
        target = Path(path).expanduser()  # noqa: ASYNC240 - local metadata calls, microseconds
        if target.exists():
            raise SnapshotError(f"{target} already exists", path=target, hint="pick a new directory")
        assert self._qemu is not None
        record = config_record(self.config, self._qemu, self.accelerator)
        try:
            partial = new_partial_dir(target)
        except OSError as exc:
            raise _save_failed(target, exc) from exc
        work = new_vm_dir("snapshot-")  # RAM-backed: the full stream and the image are made here
        if free_bytes(work) < (2 * self.config.memory_mb) << 20:  # stream + fully allocated image
            remove_snapshot(work)
            work = partial / ".work"  # no room in RAM: slower, on the snapshot's own disk
            work.mkdir()
        try:
            stream = work / "stream"
            started = time.monotonic()
            try:
                # Paused first: one pass over RAM, no dirty-page tracking and no page sent twice
                # (~15% faster than a live save under TCG, and the guest barely runs meanwhile).
                try:
                    await monitor.execute("stop")
                except BackendError as exc:
                    raise SnapshotError(f"pausing the VM failed: {exc.message}", path=target) from exc
                await save_state(monitor, stream, timeout)
            except BaseException:
                await self._resume_if_paused()
                raise
            record["volumes"] = volume_identities(self.config)  # as the snapshot's kernel left them
            if resume:
                await self._resume_if_paused()
            paused = time.monotonic()
            how = await write_snapshot_files(self.config, stream, work, partial, timeout)
            remove_snapshot(work)  # before the rename: it may live inside ``partial``
            await fsync(partial / STATE)
            log.info(
                "snapshot %s: VM paused %.0f ms, memory image and state %.0f ms (%s)", target,
                (paused - started) * 1000, (time.monotonic() - paused) * 1000, how,
            )  # fmt: skip
            write_metadata(partial, record)
            partial.rename(target)
        except OSError as exc:  # ENOSPC, EIO... from any on-disk stage: never a bare OSError
            remove_snapshot(partial)
            await self._resume_if_paused()
            raise _save_failed(target, exc) from exc
        except BaseException:
            remove_snapshot(partial)
            await self._resume_if_paused()
            raise
        finally:
            remove_snapshot(work)
        return load_snapshot(target)

    async def fork(self, count: int = 1, timeout: float = DEFAULT_SNAPSHOT_TIMEOUT) -> list[Sandbox]:
        """``count`` new sandboxes that start as copies of this one (files, memory, processes), each
        with its own identity (entropy, clock, hostname). This sandbox keeps running."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ConfigError(f"fork count must be a positive integer, got {count!r}")
        if any(disk.volume and not disk.read_only for disk in self.config.disks):
            raise VolumeError(
                "a sandbox with a read-write volume cannot be forked",
                hint="two kernels writing one ext4 volume would corrupt it; mount it read_only=True "
                "to fork, or copy its data into the sandbox first",
            )
        self._life.check()
        scratch = new_vm_dir("fork-")
        try:
            snapshot = await self.snapshot(scratch / "snapshot", timeout)
            network, addresses = self._clone_network(), self._fork_addresses(count)
            results = await asyncio.gather(
                *(restore_sandbox(snapshot, timeout, (), network, ip) for ip in addresses),
                return_exceptions=True,
            )
        finally:
            remove_snapshot(scratch)
        clones = [r for r in results if isinstance(r, Sandbox)]
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            for clone in clones:
                await clone.kill()
            raise failures[0]
        for clone in clones:
            self._pass_lifetime_to(clone)
        return clones

    def _pass_lifetime_to(self, clone: Sandbox) -> None:
        """A fork keeps its parent's deadline (the time the parent had left when it was forked):
        copying a sandbox never extends how long it may run. ``clone.set_lifetime`` changes it."""
        remaining = self.lifetime_remaining
        if remaining is not None and self._life.label is not None:
            clone._arm_lifetime(remaining, self._life.label)

    def _clone_network(self) -> VirtualNetwork | None:
        """This sandbox's network for its forks: the same gateway and policy (the one in force, after
        any ``network.set_policy``), with each port forward on a free host port of its own (this
        sandbox keeps the ports it has)."""
        network = self.config.network
        if network is None:
            return None
        forwards = tuple(replace(f, host_port=0) for f in network.gateway.forwards)
        policy = self._network.policy if self._network is not None else network.gateway.policy_value
        gateway = replace(network.gateway, forwards=forwards, policy_value=policy)
        if self._network is not None and self._network.secret_session is not None:
            gateway = gateway.sharing(self._network.secret_session)  # same placeholders and CA
        return VirtualNetwork(gateway)

    def _fork_addresses(self, count: int) -> list[ipaddress.IPv4Address | None]:
        """Distinct guest addresses for ``count`` forks, none this sandbox's own (each VM has its own
        link, so this is identity, not routing); where the subnet is too small, the usual one."""
        if self.config.network is None:
            return [None] * count
        gateway = self.config.network.gateway
        own = self._network.guest_ip if self._network is not None else gateway.guest_ip
        free = (ip for ip in gateway.network.hosts() if ip not in (gateway.gateway_ip, own))
        candidates = list(itertools.islice(free, 4096))
        if len(candidates) < count:
            return [None] * count
        return list(random.sample(candidates, count))

    async def _mount_volumes(self) -> None:
        for disk_serial, guest_path, read_only in self._volumes:
            argv = ["-c", MOUNT_SCRIPT, "sh", disk_serial, guest_path, mount_options(read_only)]
            done = await self.agent.exec("sh").args(argv).timeout(60).run()
            if done.exit_code != 0:
                raise VolumeError(
                    f"mounting the volume at {guest_path} failed: {done.stderr.strip()[:500]}",
                    hint="a custom kernel needs ext4 and virtio-blk; a volume whose filesystem a "
                    "guest damaged needs e2fsck (docs/volumes.md)",
                )

    async def _mount_shares(self) -> None:
        self._shares_mounted = bool(self._shares)
        caches = {spec.guest_path: spec.guest_cache for spec in self.config.shares}
        for share in self._shares:
            agent = self.agent
            await agent.mkdir(share.guest_path, parents=True)
            options = (
                ["trans=virtio", "version=9p2000.L", f"msize={NINE_P_MSIZE}"]
                if share.mechanism == "9p"
                else []
            )
            if share.mode is AccessMode.READ_ONLY:
                options.append("ro")  # the host refuses writes anyway; this makes them fail fast
            if share.mechanism == "9p" and caches.get(share.guest_path) == "loose":
                options.append("cache=loose")  # auto's read-only 9p shares: docs/shares.md
            argv = ["-t", share.mechanism, *(["-o", ",".join(options)] if options else [])]
            done = await agent.exec("mount").args([*argv, share.tag, share.guest_path]).timeout(30).run()
            if done.exit_code == 0 and share.mechanism == "virtiofs":
                # Larger readahead: fewer FUSE round trips per large read (~12% faster under TCG).
                script = 'echo 4096 > "/sys/class/bdi/$(mountpoint -d "$1")/read_ahead_kb"'
                await agent.exec("sh").args(["-c", script, "sh", share.guest_path]).timeout(30).run()
            try:
                done.check()
            except ExecFailedError as exc:
                raise ShareError(
                    f"mounting {share.host_path} at {share.guest_path} ({share.mechanism}) failed: "
                    f"{done.stderr.strip()[:500]}",
                    host_path=share.host_path,
                    hint="a custom kernel needs virtiofs (or 9p) support",
                ) from exc

    async def _agent_lost(self) -> CapsaError:
        """Why the agent's connection closed: usually the VM exited (then say how)."""
        process = self._process
        if process is not None:
            with contextlib.suppress(CapsaTimeoutError):
                await process.wait(2.0)
            if self._failure is not None:
                return self._failure
            if process.returncode is not None:
                reason = self._monitor.shutdown_reason if self._monitor else None
                return self._exited_error(process.returncode, reason)
        return ProtocolError("the guest agent closed its connection")

    async def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
        """Power off through the agent (clean, fast); fall back to the ACPI button, then a kill."""
        deadline = time.monotonic() + timeout
        process = self._process
        agent = self._agent
        if agent is not None and process is not None and process.returncode is None:
            if agent.channel.failure is None:
                with contextlib.suppress(CapsaError):
                    await agent.shutdown(timeout=min(_SHUTDOWN_ACK_TIMEOUT, timeout))
            with contextlib.suppress(CapsaTimeoutError):
                await process.wait(max(0.0, deadline - time.monotonic()))
        await super().stop(max(0.0, deadline - time.monotonic()))

    async def _cleanup(self) -> None:
        if self._channel is not None:
            await self._channel.close(self._life.expired or VMNotRunning("the sandbox is stopped"))
        await super()._cleanup()


def _save_failed(target: Path, exc: OSError) -> SnapshotError:
    return SnapshotError(
        f"saving the snapshot {target} failed: {exc.strerror or exc}",
        path=target,
        hint="a snapshot needs room for the guest's used memory (tens of MiB) where it is written",
    )


def _check_idle(channel: Channel) -> None:
    """Refuse to snapshot while a request or transfer is in flight (a restored copy could not
    finish it). Running processes (calls with a label) are fine: they are kept across the copy."""
    busy = [call for call in channel.unfinished_calls() if not call.label]
    if not busy:
        return
    what = [f"request {call.id} is in flight" for call in busy]
    raise SnapshotError(
        f"the sandbox cannot be snapshotted while the agent is busy: {'; '.join(what[:10])}"
        + (f" (and {len(what) - 10} more)" if len(what) > 10 else ""),
        hint="let transfers and requests finish first (running processes are fine)",
    )


async def _quiesce(channel: Channel, timeout: float) -> None:
    """Acknowledge the output consumed so far and make sure the guest has read it (the ping's
    answer comes after): a restored copy then re-delivers exactly what this host had not consumed,
    and holds no half-read frame of ours."""
    channel.flush_acks()
    try:
        expect_ok(await channel.request("ping", {}, min(timeout, 30.0)), "ping")
    except CapsaTimeoutError as exc:
        message = f"the guest agent did not answer before the snapshot: {exc.message}"
        raise SnapshotError(message) from exc


def _identity(snapshot: Snapshot) -> str | None:
    """A snapshot's identity (path and state file): the guest files of a sandbox just restored from
    it are the same each time, until the sandbox runs something."""
    try:
        state = snapshot.state.stat()
    except OSError:
        return None
    return f"{snapshot.path.resolve()}:{state.st_mtime_ns}:{state.st_size}:{state.st_ino}"


def _covers(mount: str, path: str) -> bool:
    """Whether a mount at ``mount`` hides or holds ``path`` or something under it."""
    a, b = mount.rstrip("/") + "/", path.rstrip("/") + "/"
    return a.startswith(b) or b.startswith(a)


def new_hostname() -> str:
    return f"capsa-{secrets.token_hex(3)}"


async def restore_sandbox(
    snapshot: Snapshot,
    timeout: float,
    shares: tuple[ShareSpec, ...] = (),
    network: VirtualNetwork | None = None,
    guest_ip: ipaddress.IPv4Address | None = None,
) -> Sandbox:
    """A new sandbox from ``snapshot`` (checked against this host's QEMU and files first), its share
    slots (9p) filled with ``shares`` and mounted; with a network, a new MAC and ``guest_ip`` (by
    default the gateway's usual guest address)."""
    check_compatible(snapshot, find_qemu())
    vm = Sandbox(snapshot.vm_config(shares, network), guest_ip=guest_ip)
    await vm._boot_from(snapshot, timeout)
    return vm


def _explain_exit(exc: VMExited) -> VMExited:
    """Turn "QEMU exited" into the init's own reason when it printed one."""
    for line in exc.console_tail.splitlines():
        if INIT_ERROR_MARKER in line:
            reason = line.split(INIT_ERROR_MARKER, 1)[1].lstrip(": ")
            return VMExited(
                f"the sandbox guest failed to start: {reason}",
                exit_code=exc.exit_code,
                console_tail=exc.console_tail,
                qemu_log_tail=exc.qemu_log_tail,
                hint="a custom kernel/initrd/rootfs must provide virtio drivers and python3",
            )
    return exc


def fork_plan(
    sandbox: Sandbox, count: int
) -> tuple[VirtualNetwork | None, list[ipaddress.IPv4Address | None]]:
    """The network and guest addresses of ``count`` forks of ``sandbox``: what ``Sandbox.fork``
    restores its clones with, for the sync face, which restores each on its own loop thread. A
    module function (as ``capsa.vm.handle.start_lifetime``), so the derived faces never see it."""
    return sandbox._clone_network(), sandbox._fork_addresses(count)


def pass_lifetime(parent: Sandbox, clone: Sandbox) -> None:
    """Give ``clone`` what is left of ``parent``'s deadline, as ``Sandbox.fork`` does (call it on
    the clone's loop)."""
    parent._pass_lifetime_to(clone)
