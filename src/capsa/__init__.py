"""capsa: run untrusted code in lightweight Linux virtual machines.

Sandboxes (zero configuration; a Debian guest with python3 and capsa's agent)::

    async with await capsa.sandbox().build() as vm:
        result = await vm.agent.exec("python3").args(["-c", "print(6 * 7)"]).run()
        print(result.stdout)  # "42\n"

Raw VMs::

    boot = capsa.LinuxDirectBoot("./vmlinuz", "./initrd.img")
    async with capsa.vm(boot).build() as vm:  # or: async with capsa.vm(boot) as vm
        await vm.console.wait_for("login:", timeout=30)

A synchronous facade with the same names lives in :mod:`capsa.sync`.
"""

from capsa.agent.client import Agent
from capsa.agent.exec import ExecBuilder, OutputStream, Process
from capsa.agent.types import (
    DirEntry,
    DiskUsage,
    ExecResult,
    FileStat,
    GuestInfo,
    Mount,
    ProcessInfo,
)
from capsa.boot import LinuxDirectBoot, UefiBoot
from capsa.cluster import Cluster, cluster
from capsa.console import Console
from capsa.errors import (
    AgentError,
    BackendError,
    CapacityError,
    CapsaError,
    CapsaTimeoutError,
    ConfigError,
    ConsoleTimeoutError,
    ExecFailedError,
    ExecOutputLimitError,
    ExecTimeoutError,
    GuestFileError,
    GuestFileExistsError,
    GuestFileNotFoundError,
    GuestPermissionError,
    ImageError,
    ProtocolError,
    SandboxLost,
    ShareError,
    SnapshotError,
    StartTimeoutError,
    UnknownUserError,
    VMExited,
    VMNotRunning,
    VMStateError,
    VolumeError,
)
from capsa.image import kernels as _kernels
from capsa.net.gateway import Gateway, VirtualNetwork
from capsa.net.policy import Action, All, AnyOf, Cidr, Domain, Ip, NetworkPolicy, Port
from capsa.recipes.image import Image
from capsa.sandbox import Pool, Sandbox, SandboxBuilder, Snapshot, pool, sandbox
from capsa.shares import AccessMode, Share
from capsa.vm import VM, RunState, VMBuilder, vm
from capsa.vm import uefi_launch as _uefi_launch
from capsa.volume import Volume, volume

# The image layer gives the VM layer the kernel a UEFI VM's KVM probe boots (downloaded only then).
_uefi_launch.set_probe_kernel(lambda: _kernels.debian_kernel().path)

__version__ = "0.1.0"

__all__ = [
    "VM",
    "AccessMode",
    "Action",
    "Agent",
    "AgentError",
    "All",
    "AnyOf",
    "BackendError",
    "CapacityError",
    "CapsaError",
    "CapsaTimeoutError",
    "Cidr",
    "Cluster",
    "ConfigError",
    "Console",
    "ConsoleTimeoutError",
    "DirEntry",
    "DiskUsage",
    "Domain",
    "ExecBuilder",
    "ExecFailedError",
    "ExecOutputLimitError",
    "ExecResult",
    "ExecTimeoutError",
    "FileStat",
    "Gateway",
    "GuestFileError",
    "GuestFileExistsError",
    "GuestFileNotFoundError",
    "GuestInfo",
    "GuestPermissionError",
    "Image",
    "ImageError",
    "Ip",
    "LinuxDirectBoot",
    "Mount",
    "NetworkPolicy",
    "OutputStream",
    "Pool",
    "Port",
    "Process",
    "ProcessInfo",
    "ProtocolError",
    "RunState",
    "Sandbox",
    "SandboxBuilder",
    "SandboxLost",
    "Share",
    "ShareError",
    "Snapshot",
    "SnapshotError",
    "StartTimeoutError",
    "UefiBoot",
    "UnknownUserError",
    "VMBuilder",
    "VMExited",
    "VMNotRunning",
    "VMStateError",
    "VirtualNetwork",
    "Volume",
    "VolumeError",
    "__version__",
    "cluster",
    "pool",
    "sandbox",
    "vm",
    "volume",
]
