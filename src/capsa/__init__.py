"""capsa: run untrusted code in lightweight Linux virtual machines.

Raw VMs::

    boot = capsa.LinuxDirectBoot("./vmlinuz", "./initrd.img")
    async with capsa.vm(boot).build() as vm:  # or: async with capsa.vm(boot) as vm
        await vm.console.wait_for("login:", timeout=30)

A synchronous facade with the same names lives in :mod:`capsa.sync`.
"""

from capsa.boot import LinuxDirectBoot, UefiBoot
from capsa.console import Console
from capsa.errors import (
    BackendError,
    CapsaError,
    CapsaTimeoutError,
    ConfigError,
    ConsoleTimeoutError,
    ImageError,
    ProtocolError,
    VMExited,
    VMNotRunning,
)
from capsa.vm import VM, RunState, VMBuilder, vm

__version__ = "0.1.0"

__all__ = [
    "VM",
    "BackendError",
    "CapsaError",
    "CapsaTimeoutError",
    "ConfigError",
    "Console",
    "ConsoleTimeoutError",
    "ImageError",
    "LinuxDirectBoot",
    "ProtocolError",
    "RunState",
    "UefiBoot",
    "VMBuilder",
    "VMExited",
    "VMNotRunning",
    "__version__",
    "vm",
]
