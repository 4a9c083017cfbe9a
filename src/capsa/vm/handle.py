"""A running (or finished) VM: lifecycle, console, logs."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import shutil
import socket
from pathlib import Path
from types import TracebackType

from capsa._guardian import new_vm_dir
from capsa.accelerator import host_tsc_khz, resolve_accelerator
from capsa.backend.qemu.argv import LaunchPlan, PlannedShare, build_argv
from capsa.backend.qemu.monitor import Monitor
from capsa.backend.qemu.process import QemuProcess, find_qemu
from capsa.boot import LinuxDirectBoot
from capsa.console import Console
from capsa.errors import (
    BackendError,
    CapsaError,
    CapsaTimeoutError,
    ConfigError,
    ShareError,
    VMExited,
    VMNotRunning,
)
from capsa.net.stack import NetworkStack
from capsa.shares.spec import Share
from capsa.shares.virtiofsd import find_virtiofsd, start_virtiofsd
from capsa.vm.config import VMConfig
from capsa.vm.runstate import RunState

log = logging.getLogger(__name__)

DEFAULT_STOP_TIMEOUT = 10.0
_QMP_HANDSHAKE_TIMEOUT = 30.0


class VM:
    """Handle of one QEMU virtual machine. Create it with ``await capsa.vm(boot).build()``.

    ``async with vm:`` stops it (gracefully, then by force) and removes its runtime directory.
    """

    def __init__(self, config: VMConfig) -> None:
        self.config = config
        self._state = RunState.CREATED
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
        self._daemon_watches: list[asyncio.Task[None]] = []
        self._failure: CapsaError | None = None  # why capsa stopped the VM on its own, if it did
        self._qemu: str | None = None
        self._network: NetworkStack | None = None
        self._guest_ip: ipaddress.IPv4Address | None = (
            None  # a restore's own address (else the gateway's default)
        )

    # -- properties --

    @property
    def status(self) -> RunState:
        return self._state

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

    # -- start --

    async def _start(self, timeout: float = _QMP_HANDSHAKE_TIMEOUT, *, incoming: bool = False) -> None:
        if self._state is not RunState.CREATED:
            raise CapsaError(f"a VM handle starts once; this one is {self._state.value}")
        self._state = RunState.STARTING
        try:
            await self._launch(timeout, incoming)
        except BaseException:
            self._state = RunState.FAILED
            await self._cleanup()
            raise
        self._state = RunState.RUNNING

    async def _launch(self, timeout: float, incoming: bool = False) -> None:
        config = self.config
        config.validate()
        qemu = self._qemu = find_qemu()
        boot = config.boot
        assert isinstance(boot, LinuxDirectBoot)  # validate() refuses the rest
        self._accelerator = await resolve_accelerator(config.accelerator, boot.kernel)
        self._dir = new_vm_dir()
        logs = self._dir / "logs"
        logs.mkdir()
        planned = await self._start_shares(logs)
        net_socket = net_mac = None
        if config.network is not None:
            self._network = NetworkStack(config.network.gateway, guest_ip=self._guest_ip)
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
        self._exit_watch = asyncio.ensure_future(self._watch_exit())
        for daemon, share in zip(
            self._daemons, [s for s in self._shares if s.mechanism == "virtiofs"], strict=True
        ):
            self._daemon_watches.append(asyncio.ensure_future(self._watch_daemon(daemon, share)))
        log.info("VM %s started (pid %d, %s)", self._dir.name, self._process.pid, self._accelerator)

    async def _start_shares(self, logs: Path) -> list[PlannedShare]:
        """Decide each share's mechanism and start a virtiofsd per virtio-fs share (before QEMU,
        which connects to their sockets as it starts)."""
        assert self._dir is not None
        virtiofsd = find_virtiofsd() if self.config.shares else None
        planned: list[PlannedShare] = []
        for index, spec in enumerate(self.config.shares):
            mechanism = spec.mechanism
            if mechanism == "auto":
                mechanism = "virtiofs" if virtiofsd else "9p"
            tag = f"capsa{index}"
            socket_path = None
            if mechanism == "virtiofs":
                if virtiofsd is None:
                    raise ConfigError(
                        "share: virtiofsd not found",
                        hint="apt-get install qemu-system-common, or share with mechanism='9p'",
                    )
                socket_path = self._dir / f"fs{index}.sock"
                log_path = logs / f"virtiofsd-{index}.log"
                self._daemons.append(await start_virtiofsd(virtiofsd, spec, socket_path, log_path))
            planned.append(PlannedShare(tag, spec.host_path, spec.read_only, mechanism, socket_path))
            self._shares.append(Share(tag, spec.host_path, spec.guest_path, spec.mode, mechanism))
        return planned

    async def _watch_daemon(self, daemon: QemuProcess, share: Share) -> None:
        """A virtiofsd dying under a running guest would hang its filesystem: stop the VM, say why."""
        code = await daemon.exited
        process = self._process
        if process is not None and process.returncode is None:
            # virtiofsd also exits when QEMU goes away (guest power-off): give that a moment.
            with contextlib.suppress(CapsaTimeoutError):
                await process.wait(1.0)
        if self._stopping or self._cleaned or process is None or process.returncode is not None:
            return
        self._failure = ShareError(
            f"virtiofsd serving {share.host_path} (guest {share.guest_path}) died with status {code}; "
            "the VM was stopped",
            host_path=share.host_path,
            log_tail=daemon.log_tail(),
        )
        log.error("%s", self._failure.message)
        await process.kill_and_wait()

    # -- exit handling --

    async def _watch_exit(self) -> None:
        assert self._process is not None
        code = await self._process.exited
        reason = self._monitor.shutdown_reason if self._monitor else None
        if self._stopping or (code == 0):
            self._state = RunState.STOPPED
        else:
            self._state = RunState.FAILED
        log.info("VM exited: code %s, reason %s", code, reason)
        if self._console is not None:
            self._console._mark_exited(lambda: self._exited_error(code, reason))

    def _exited_error(self, code: int | None, reason: str | None) -> VMExited:
        what = f"guest {reason}" if reason else "QEMU exited"
        if self._failure is not None:
            what = self._failure.message
        return VMExited(
            f"the VM exited ({what}, QEMU exit status {code})",
            exit_code=code,
            console_tail=self._console.tail() if self._console else "",
            qemu_log_tail=self._process.log_tail() if self._process else "",
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
            self._state = RunState.STOPPING
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
            self._state = RunState.STOPPED
        await self._cleanup()

    async def _cleanup(self) -> None:
        if self._cleaned:
            return
        self._cleaned = True
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
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    # -- context manager --

    async def __aenter__(self) -> VM:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
