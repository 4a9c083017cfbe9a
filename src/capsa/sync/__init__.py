"""Synchronous facade: the same names as the async API, for code that does not use asyncio.

::

    from capsa import sync

    with sync.sandbox().build() as vm:
        print(vm.agent.exec("uname").arg("-a").run().stdout)

    with sync.vm(LinuxDirectBoot("vmlinuz", "initrd")).build() as vm:
        vm.console.wait_for("# ", timeout=30)
        print(vm.console.exec_line("uname -a"))

    with sync.cluster(net) as c:
        db = c.add("db", sync.sandbox())

Each handle owns one event-loop thread (see :mod:`capsa._portal`); there is no global loop. The
faces are derived from the async classes (:mod:`capsa.sync._derive`), not copied from them.
"""

from capsa.sync._agent import SyncAgent, SyncExecBuilder, SyncOutputStream, SyncProcess
from capsa.sync._cluster import SyncCluster, cluster
from capsa.sync._derive import finish as _finish
from capsa.sync._sandbox import SyncSandbox, SyncSandboxBuilder, sandbox
from capsa.sync._vm import SyncConsole, SyncNetwork, SyncVM, SyncVMBuilder, vm

_finish()

__all__ = [
    "SyncAgent",
    "SyncCluster",
    "SyncConsole",
    "SyncExecBuilder",
    "SyncNetwork",
    "SyncOutputStream",
    "SyncProcess",
    "SyncSandbox",
    "SyncSandboxBuilder",
    "SyncVM",
    "SyncVMBuilder",
    "cluster",
    "sandbox",
    "vm",
]
