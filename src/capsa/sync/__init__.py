"""Synchronous facade: the same names as the async API, for code that does not use asyncio.

::

    from capsa import sync

    with sync.sandbox().build() as vm:
        print(vm.agent.exec("uname").arg("-a").run().stdout)

    with sync.vm(LinuxDirectBoot("vmlinuz", "initrd")).build() as vm:
        vm.console.wait_for("# ", timeout=30)
        print(vm.console.exec_line("uname -a"))

Each handle owns one event-loop thread (see :mod:`capsa._portal`); there is no global loop.
"""

from capsa.sync._agent import SyncAgent, SyncExecBuilder, SyncOutputStream, SyncProcess
from capsa.sync._sandbox import SyncSandbox, SyncSandboxBuilder, sandbox
from capsa.sync._vm import SyncConsole, SyncVM, SyncVMBuilder, vm

__all__ = [
    "SyncAgent",
    "SyncConsole",
    "SyncExecBuilder",
    "SyncOutputStream",
    "SyncProcess",
    "SyncSandbox",
    "SyncSandboxBuilder",
    "SyncVM",
    "SyncVMBuilder",
    "sandbox",
    "vm",
]
