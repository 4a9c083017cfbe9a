"""A running (or finished) VM: its state machine, launch, stop and cleanup.

The other concerns of a VM live beside it: its lifetime (:mod:`capsa.vm.lifetime`), its shares'
virtiofsd daemons (:mod:`capsa.vm.virtiofs`), the error its exit is reported as
(:mod:`capsa.vm.exits`), QEMU's argv (:mod:`capsa.vm.argv`) and a UEFI launch
(:mod:`capsa.vm.uefi_launch`)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import shutil
import socket
from pathlib import Path

from capsa._context import StopsOnExit
from capsa._guardian import new_vm_dir
from capsa._tasks import TaskSet
from capsa.accelerator import host_tsc_khz, resolve_accelerator
from capsa.backend.qemu.monitor import Monitor
from capsa.backend.qemu.process import QemuProcess, find_qemu
from capsa.boot import LinuxDirectBoot, UefiBoot
from capsa.console import Console
from capsa.errors import (
    BackendError,
    CapsaError,
    CapsaTimeoutError,
    VMExited,
    VMNotRunning,
    VMStateError,
)
from capsa.net.stack import NetworkStack, open_stack
from capsa.shares.spec import Share
from capsa.uefi.watch import watch_firmware
from capsa.vm.admission import admit
from capsa.vm.argv import LaunchPlan, build_argv
from capsa.vm.config import VMConfig, validate_lifetime
from capsa.vm.exits import exited_error
from capsa.vm.lifetime import Lifetime
from capsa.vm.runstate import RunState
from capsa.vm.uefi_launch import prepare_uefi_async, release_uefi, uefi_accelerator
from capsa.vm.virtiofs import start_shares, watch_daemon
from capsa.volume.lock import lock_volume

log = logging.getLogger(__name__)

DEFAULT_STOP_TIMEOUT = 10.0
_QMP_HANDSHAKE_TIMEOUT = 30.0


class VM(StopsOnExit):
    """Handle of one QEMU virtual machine. Create it with ``await capsa.vm(boot).build()``.

    ``async with vm:`` stops it (gracefully, then by force) and removes its runtime directory.
    """

    _KIND = "VM"  # how messages name this kind of handle

    def __init__(self, config: VMConfig, *, guest_ip: ipaddress.IPv4Address | None = None) -> None:
        """``guest_ip``: the guest's address on ``config.network`` (a restored snapshot's own;
        by default the gateway's usual guest address)."""
        self.config = config
        self._state = RunState.CREATED  # changed only by _set_state()
        self._state_waiters: list[tuple[frozenset[RunState], asyncio.Future[RunState]]] = []
        self._process: QemuProcess | None = None
        self._monitor: Monitor | None = None
        self._console: Console | None = None
        self._dir: Path | None = None
        self._accelerator: str | None = None
        self._exit_watch: asyncio.Task[None] | None = None
        self._cleaned = False
        self._stopping = False
        self._ports: dict[str, socket.socket] = {}
        self._shares: list[Share] = []
        self._daemons: list[QemuProcess] = []
        self._volume_locks: list[int] = []  # one flock per volume disk, held while QEMU may run
        self._daemon_watches: list[asyncio.Task[None]] = []
        self._failure: CapsaError | None = None  # why capsa stopped the VM on its own, if it did
        self._qemu: str | None = None
        self._network: NetworkStack | None = None
        self._guest_ip = guest_ip
        self._tasks = TaskSet(log)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._life = Lifetime()

    # -- properties --

    @property
    def status(self) -> RunState:
        return self._state

    # -- state machine --

    def _set_state(self, new: RunState) -> bool:
        """The one place the state changes. A transition the lifecycle does not allow (see
        ``RunState.can_become``; final states are final) is refused and returns False."""
        old = self._state
        if new is old:
            return True
        if not old.can_become(new):
            if not old.is_final:
                log.error("%s: refused state change %s -> %s", self._KIND, old.value, new.value)
            return False
        self._state = new
        for states, future in self._state_waiters:
            if new in states and not future.done():
                future.set_result(new)
        self._state_waiters = [(s, f) for s, f in self._state_waiters if not f.done()]
        return True

    async def wait_for_state(self, *states: RunState, timeout: float | None = None) -> RunState:
        """Wait until the handle is in one of ``states`` (returns it); :class:`CapsaTimeoutError`
        after ``timeout`` seconds."""
        if self._state in states:
            return self._state
        future: asyncio.Future[RunState] = asyncio.get_running_loop().create_future()
        entry = (frozenset(states), future)
        self._state_waiters.append(entry)
        try:
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError:
            wanted = " or ".join(s.value for s in states)
            raise CapsaTimeoutError(
                f"the {self._KIND} did not become {wanted} within {timeout}s; it is {self._state.value}"
            ) from None
        finally:
            if entry in self._state_waiters:
                self._state_waiters.remove(entry)

    def _require(self, *states: RunState, action: str) -> None:
        """Raise :class:`VMStateError` unless the handle is in one of ``states``."""
        if self._state not in states:
            wanted = " or ".join(s.value for s in states)
            raise VMStateError(
                f"{action} needs a {wanted} {self._KIND}; it is {self._state.value}",
                state=self._state,
                required=states,
            )

    @property
    def accelerator(self) -> str:
        """``"kvm"`` or ``"tcg"``: what this VM actually runs on."""
        if self._accelerator is None:
            raise VMNotRunning("the VM has not been started")
        return self._accelerator

    @property
    def console(self) -> Console:
        if self._console is None:
            raise VMNotRunning("the VM has not been started")
        return self._console

    @property
    def log_dir(self) -> Path:
        """Holds ``console.log`` (the full serial transcript) and ``qemu.log``. Removed on stop."""
        if self._dir is None:
            raise VMNotRunning("the VM has not been started")
        return self._dir / "logs"

    def port_socket(self, name: str) -> socket.socket:
        """The host end of the virtio-serial port ``name`` (see ``VMBuilder.virtio_port``), a connected
        stream socket. The caller takes it over: call once per port; capsa no longer closes it."""
        try:
            return self._ports.pop(name)
        except KeyError:
            raise CapsaError(
                f"no unclaimed virtio-serial port named {name!r}",
                hint="declare it with .virtio_port(name); each port's socket is handed out once",
            ) from None

    @property
    def shares(self) -> list[Share]:
        """The VM's shared directories; each unpacks as ``(tag, host_path, guest_path, mode)``.
        In a raw VM mount them yourself: ``mount -t virtiofs <tag> <guest_path>``."""
        return list(self._shares)

    @property
    def network(self) -> NetworkStack:
        """The VM's virtual network (``vm.network.log()`` lists every egress decision)."""
        if self._network is None:
            raise CapsaError("this VM has no network", hint="build it with .network(VirtualNetwork())")
        return self._network

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def exit_code(self) -> int | None:
        return self._process.returncode if self._process else None

    # -- lifetime --

    @property
    def lifetime_remaining(self) -> float | None:
        """Seconds until the lifetime ends (``0.0`` once it has); ``None`` without a lifetime."""
        return self._life.remaining(self._loop)

    @property
    def lifetime_expired(self) -> bool:
        """True once the lifetime ran out and capsa stopped and removed the VM."""
        return self._life.expired is not None

    def set_lifetime(self, seconds: float) -> None:
        """Stop and remove this VM ``seconds`` from now, replacing any earlier lifetime (so it
        extends or shortens it). When it runs out the VM is killed and cleaned up, and every later
        call raises :class:`VMNotRunning` saying the lifetime expired. Call it from the VM's loop."""
        seconds = validate_lifetime(seconds)
        self._life.check()
        self._require(RunState.RUNNING, action="a lifetime")
        self._arm_lifetime(seconds, seconds)

    async def _start_lifetime(self, seconds: float) -> None:
        """The builder's lifetime, right after ``build()``: a VM that cannot take it is killed."""
        try:
            self.set_lifetime(seconds)
        except BaseException:
            await self.kill()
            raise

    def _arm_lifetime(self, remaining: float, label: float) -> None:
        """End the lifetime ``remaining`` seconds from now; messages call it a lifetime of ``label``."""
        assert self._loop is not None  # set by _start()
        self._life.arm(self._loop, remaining, label, self._lifetime_ended)

    def _lifetime_ended(self) -> None:
        if self._stopping or self._cleaned or self._state is not RunState.RUNNING:
            return
        self._failure = self._life.expire(self._KIND)  # the reason every waiter and later call is given
        log.info("%s %s: %s", self._KIND, self._dir.name if self._dir else "?", self._failure.message)
        self._tasks.spawn(self.kill(), name=f"capsa-lifetime-{self._KIND}")

    # -- start --

    async def _start(self, timeout: float = _QMP_HANDSHAKE_TIMEOUT, *, incoming: bool = False) -> None:
        self._require(RunState.CREATED, action="starting (a VM handle starts once)")
        self._set_state(RunState.STARTING)
        self._loop = asyncio.get_running_loop()
        try:
            with admit():  # refused here: nothing was started, so nothing is left half-built
                await self._launch(timeout, incoming)
        except BaseException:
            self._set_state(RunState.FAILED)
            await self._cleanup()
            raise
        self._set_state(RunState.RUNNING)  # refused if QEMU already exited: the state stays final

    async def _launch(self, timeout: float, incoming: bool = False) -> None:
        config = self.config
        config.validate()
        for disk in config.disks:
            if disk.volume:  # before QEMU opens it: a clear error instead of QEMU's lock failure
                name = disk.path.name.removesuffix(".ext4")
                self._volume_locks.append(
                    lock_volume(disk.path, exclusive=not disk.read_only, name=name)
                )
        qemu = self._qemu = find_qemu()
        boot = config.boot
        if isinstance(boot, LinuxDirectBoot):
            self._accelerator = await resolve_accelerator(config.accelerator, boot.kernel)
        else:
            self._accelerator = await uefi_accelerator(config.accelerator)
        self._dir = new_vm_dir()
        uefi = await prepare_uefi_async(boot, self._dir) if isinstance(boot, UefiBoot) else None
        logs = self._dir / "logs"
        logs.mkdir()
        planned = await start_shares(
            config.shares, self._dir, logs, shares=self._shares, daemons=self._daemons
        )
        net_socket = net_mac = None
        if config.network is not None:
            self._network = open_stack(config.network.gateway, self._guest_ip)
            net_socket = self._dir / "net.sock"
            await self._network.start(net_socket)
            net_mac = ":".join(f"{b:02x}" for b in self._network.guest_mac)
        console_host, console_qemu = socket.socketpair()
        qmp_host, qmp_qemu = socket.socketpair()
        port_pairs = [socket.socketpair() for _ in config.virtio_ports]
        qemu_ends = [console_qemu.fileno(), qmp_qemu.fileno(), *(q.fileno() for _, q in port_pairs)]
        try:
            plan = LaunchPlan(
                qemu=qemu,
                accelerator=self._accelerator,
                console_fd=console_qemu.fileno(),
                qmp_fd=qmp_qemu.fileno(),
                host_khz=host_tsc_khz(),
                port_fds=tuple(q.fileno() for _, q in port_pairs),
                shares=tuple(planned),
                incoming=incoming,
                net_socket=net_socket,
                net_mac=net_mac,
                uefi=uefi,
            )
            argv = build_argv(config, plan)
            (logs / "qemu.argv").write_text("\n".join(argv) + "\n")
            self._console = Console(console_host, logs / "console.log")
            self._process = await QemuProcess.start(
                argv,
                pass_fds=tuple(qemu_ends),
                log_path=logs / "qemu.log",
            )
        except BaseException:
            console_host.close()
            qmp_host.close()
            for host_end, _ in port_pairs:
                host_end.close()
            raise
        finally:
            console_qemu.close()
            qmp_qemu.close()
            for _, qemu_end in port_pairs:
                qemu_end.close()
        self._ports = {name: pair[0] for name, pair in zip(config.virtio_ports, port_pairs, strict=True)}
        self._monitor = Monitor(f"qmp-{self._dir.name}")
        try:
            await self._monitor.connect(qmp_host, timeout)
        except BackendError as exc:
            process = self._process
            with contextlib.suppress(CapsaTimeoutError):
                await process.wait(2.0)
            raise BackendError(
                "QEMU failed to start"
                + (f" (exit {process.returncode})" if process.returncode is not None else ""),
                qemu_log_tail=process.log_tail(),
                hint="see the QEMU log tail; 'capsa doctor' checks the installation",
            ) from exc
        self._exit_watch = self._tasks.spawn(self._watch_exit(), name="capsa-vm-exit")
        served = [s for s in self._shares if s.mechanism == "virtiofs"]
        for daemon, share in zip(self._daemons, served, strict=True):
            watch = self._tasks.spawn(self._watch_daemon(daemon, share), name="capsa-virtiofsd")
            self._daemon_watches.append(watch)
        if uefi is not None:  # firmware that finds nothing to boot would loop until a timeout
            watch = self._tasks.spawn(self._watch_firmware(logs / "console.log"), name="capsa-uefi")
            self._daemon_watches.append(watch)
        log.info("VM %s started (pid %d, %s)", self._dir.name, self._process.pid, self._accelerator)

    async def _watch_firmware(self, transcript: Path) -> None:
        """UEFI firmware that gave up booting: stop the VM, and tell waiters which loader failed."""
        failure = await watch_firmware(transcript, lambda: self.exit_code is None)
        if failure is None or self._stopping or self._cleaned or self._process is None:
            return
        self._failure = failure
        log.error("%s", failure.message)
        await self._process.kill_and_wait()

    async def _watch_daemon(self, daemon: QemuProcess, share: Share) -> None:
        """A virtiofsd dying under a running guest would hang its filesystem: stop the VM, say why."""
        failure = await watch_daemon(
            daemon, share, lambda: self._process, lambda: self._stopping or self._cleaned
        )
        if failure is not None and self._process is not None:
            self._failure = failure
            log.error("%s", failure.message)
            await self._process.kill_and_wait()

    # -- exit handling --

    async def _watch_exit(self) -> None:
        assert self._process is not None
        code = await self._process.exited
        reason = self._monitor.shutdown_reason if self._monitor else None
        self._set_state(RunState.STOPPED if self._stopping or code == 0 else RunState.FAILED)
        log.info("VM exited: code %s, reason %s", code, reason)
        if self._monitor is not None:
            # QEMU hung up: close QMP now, so that qemu.qmp's reader (ended by EOFError) is
            # collected here, not reported "never retrieved" when a handle nobody stopped is freed.
            await self._monitor.close()
        if self._console is not None:
            self._console._mark_exited(lambda: self._exited_error(code, reason))

    def _exited_error(self, code: int | None, reason: str | None) -> VMExited:
        return exited_error(
            code,
            reason,
            failure=self._failure.message if self._failure is not None else None,
            console_tail=self._console.tail() if self._console else "",
            qemu_log_tail=self._process.log_tail() if self._process else "",
            boot=self.config.boot,
        )

    @property
    def shutdown_reason(self) -> str | None:
        """QEMU's reason for the last guest shutdown (``guest-shutdown``, ``guest-reset``…), if any."""
        return self._monitor.shutdown_reason if self._monitor else None

    async def wait(self, timeout: float | None = None) -> int:
        """Wait for the VM to exit on its own; returns QEMU's exit status."""
        if self._process is None:
            raise VMNotRunning("the VM has not been started")
        code = await self._process.wait(timeout)
        if self._exit_watch is not None:
            await self._exit_watch
        await self._cleanup()
        return code

    # -- stop --

    async def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
        """Ask the guest to power off (ACPI power button); kill it if it has not exited in
        ``timeout`` seconds. Always cleans up. Safe to call more than once."""
        process = self._process
        if process is not None and process.returncode is None:
            self._stopping = True
            self._set_state(RunState.STOPPING)
            if self._monitor is not None and timeout > 0:
                with contextlib.suppress(BackendError):
                    await self._monitor.execute("system_powerdown", timeout=min(timeout, 5.0))
            try:
                await process.wait(timeout)
            except CapsaTimeoutError:
                log.info("guest ignored the power button for %.1fs; killing QEMU", timeout)
                await process.kill_and_wait()
        await self._finish()

    async def kill(self) -> None:
        """Kill QEMU now (SIGKILL) and clean up. Idempotent."""
        if self._process is not None and self._process.returncode is None:
            self._stopping = True
            await self._process.kill_and_wait()
        await self._finish()

    async def _finish(self) -> None:
        if self._exit_watch is not None:
            await self._exit_watch
        if self._state is RunState.CREATED:
            self._set_state(RunState.STOPPED)
        await self._cleanup()

    async def _cleanup(self) -> None:
        if self._cleaned:
            return
        self._cleaned = True
        try:
            self._life.cancel()
            if self._process is not None and self._process.returncode is None:
                await self._process.kill_and_wait()
            if self._monitor is not None:
                await self._monitor.close()
            if self._console is not None:
                await self._console._close()
            for sock in self._ports.values():
                sock.close()
            self._ports.clear()
            for daemon in self._daemons:
                with contextlib.suppress(CapsaError):
                    await daemon.kill_and_wait()
            for watch in self._daemon_watches:
                watch.cancel()
            if self._network is not None:
                await self._network.close()
        finally:  # a cleanup cancelled midway (a pool closed during a restore) still frees these
            for fd in self._volume_locks:  # QEMU has exited: the volume is free for another VM
                os.close(fd)
            self._volume_locks.clear()
            if self._dir is not None:
                release_uefi(self._dir)  # unlock a UefiBoot's vars= file, if it has one
                shutil.rmtree(self._dir, ignore_errors=True)

    # -- context manager --


# -- the friend interface: what sandbox and snapshot code does to a VM beyond its public API --
# (module functions, not methods, so that the sync and Ray faces, derived from the public methods,
# never see them)


async def start_incoming(vm: VM, timeout: float) -> Monitor:
    """Start ``vm``'s QEMU paused, waiting for a migration stream (a snapshot restore, or the
    helper that splits a memory image), and return its QMP monitor to feed the stream to."""
    await vm._start(timeout, incoming=True)
    assert vm._monitor is not None
    return vm._monitor


async def start_lifetime(vm: VM, seconds: float) -> None:
    """Arm a builder's lifetime right after ``build()``: a VM that cannot take it is killed."""
    await vm._start_lifetime(seconds)
