"""What the agent does only as the guest's PID 1 (``Agent(init=True)``): find its virtio port, take
``SIGCHLD`` (it reaps every orphan of the guest), watch the ACPI power button, set the guest's
identity (entropy, clock, hostname, link) on ``refresh``, and power the machine off.

An embedded agent (``init=False``, e.g. a test serving a socketpair) never calls into this module:
none of it is safe outside a guest.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import struct
import sys
import time
from typing import NoReturn

from capsa.agent.guest.link import LinkIdentity, take_link_identity
from capsa.agent.guest.sessions import log

PORT_NAME = "capsa.agent"
PORT_WAIT_SECONDS = 10.0
INIT_ERROR_MARKER = "CAPSA-INIT-ERROR"  # same as capsa.image.sandbox's (the host looks for it)
_LINUX_REBOOT_CMD_POWER_OFF = 0x4321FEDC
_RNDADDENTROPY = 0x40085203  # _IOW('R', 0x03, int[2])
_RNDRESEEDCRNG = 0x5207  # _IO('R', 0x07)


class StartupError(Exception):
    """The agent cannot serve; reported on the console like the init's own errors."""


def find_port(name: str = PORT_NAME, wait: float = PORT_WAIT_SECONDS) -> str:
    deadline = time.monotonic() + wait
    while True:
        try:
            entries = os.listdir("/sys/class/virtio-ports")
        except OSError:
            entries = []
        for entry in entries:
            try:
                with open(f"/sys/class/virtio-ports/{entry}/name") as fh:
                    if fh.read().strip() == name:
                        return f"/dev/{entry}"
            except OSError:
                continue
        if time.monotonic() > deadline:
            raise StartupError(f"no virtio-serial port named {name} (virtio_console driver missing?)")
        time.sleep(0.01)


def take_signals() -> int:
    """``SIGCHLD`` wakes the loop through the returned pipe (read end); ``SIGINT`` is ignored."""
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    # PID 1 ignores signals it has no handler for; a no-op handler (reset by exec in children) keeps
    # a guest "kill -INT 1" from raising KeyboardInterrupt in the agent.
    signal.signal(signal.SIGINT, lambda *_: None)
    return wake_r


def open_power_buttons() -> list[int]:
    fds: list[int] = []
    try:
        names = os.listdir("/sys/class/input")
    except OSError:
        return fds
    for name in names:
        if not name.startswith("event"):
            continue
        try:
            with open(f"/sys/class/input/{name}/device/name") as fh:
                if fh.read().strip() != "Power Button":
                    continue
            fds.append(os.open(f"/dev/input/{name}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC))
        except OSError:
            continue
    return fds


def set_identity(entropy: bytes, now: float, hostname: str, link: LinkIdentity | None) -> None:
    """A restored or forked guest takes a new identity: fresh entropy (the RNG state came from the
    snapshot, shared by every clone), the host's clock, its own hostname, and with a network its
    own MAC and address. Every value was checked by the caller."""
    with open("/dev/urandom", "wb") as fh:
        fcntl.ioctl(fh, _RNDADDENTROPY, struct.pack("ii", len(entropy) * 8, len(entropy)) + entropy)
        fcntl.ioctl(fh, _RNDRESEEDCRNG)
    time.clock_settime(time.CLOCK_REALTIME, now)
    with open("/proc/sys/kernel/hostname", "w") as fh:
        fh.write(hostname)
    with open("/etc/hostname", "w") as fh:
        fh.write(hostname + "\n")
    if link is not None:
        take_link_identity(link)


def power_off() -> NoReturn:
    with contextlib.suppress(OSError):
        os.kill(-1, signal.SIGKILL)  # every process but PID 1
    os.sync()
    import ctypes  # noqa: PLC0415 - only needed once, at power-off

    libc = ctypes.CDLL(None, use_errno=True)
    libc.reboot(_LINUX_REBOOT_CMD_POWER_OFF)
    log(f"reboot(POWER_OFF) failed: {os.strerror(ctypes.get_errno())}")
    os._exit(1)


def startup_failed(exc: BaseException) -> NoReturn:
    sys.stderr.write(f"{INIT_ERROR_MARKER}: {exc}\n")
    sys.stderr.flush()
    power_off()
