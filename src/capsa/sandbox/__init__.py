"""Sandboxes: VMs with capsa's guest agent (``capsa.sandbox()``), snapshots and pools."""

from capsa.sandbox.builder import SandboxBuilder, SandboxConfig, sandbox
from capsa.sandbox.handle import Sandbox
from capsa.sandbox.pool import Pool, pool
from capsa.snapshot.store import Snapshot

__all__ = ["Pool", "Sandbox", "SandboxBuilder", "SandboxConfig", "Snapshot", "pool", "sandbox"]
