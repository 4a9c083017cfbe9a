"""The blocking facade (``capsa.sync``) has the same public names as the async API."""

from __future__ import annotations

import pytest

import capsa
from capsa import sync
from capsa.agent.client import Agent
from capsa.agent.exec import ExecBuilder, Process
from capsa.sync._agent import SyncAgent, SyncExecBuilder, SyncProcess

# Set per instance in the sync twins (so not on the class), or async-only internals.
INSTANCE_ATTRIBUTES = {"agent", "console", "pid"}
ASYNC_ONLY = {"vm_config", "channel"}


def _public(cls: type) -> set[str]:
    return {name for name in dir(cls) if not name.startswith("_")}


@pytest.mark.parametrize(
    ("async_cls", "sync_cls"),
    [
        (capsa.SandboxBuilder, sync.SyncSandboxBuilder),
        (capsa.VMBuilder, sync.SyncVMBuilder),
        (capsa.VM, sync.SyncVM),
        (capsa.Sandbox, sync.SyncSandbox),
        (Agent, SyncAgent),
        (ExecBuilder, SyncExecBuilder),
        (Process, SyncProcess),
    ],
)
def test_sync_twin_has_every_public_name(async_cls: type, sync_cls: type) -> None:
    missing = _public(async_cls) - _public(sync_cls) - INSTANCE_ATTRIBUTES - ASYNC_ONLY
    assert not missing, f"{sync_cls.__name__} lacks {sorted(missing)}"


def test_lifetime_names_exist_on_both_faces() -> None:
    for name in ("lifetime",):
        assert hasattr(capsa.SandboxBuilder, name) and hasattr(sync.SyncSandboxBuilder, name)
        assert hasattr(capsa.VMBuilder, name) and hasattr(sync.SyncVMBuilder, name)
    for name in ("set_lifetime", "lifetime_remaining", "lifetime_expired"):
        assert hasattr(capsa.VM, name) and hasattr(sync.SyncVM, name)
