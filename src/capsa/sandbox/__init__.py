"""Sandboxes: VMs with capsa's guest agent (``capsa.sandbox()``)."""

from capsa.sandbox.builder import SandboxBuilder, SandboxConfig, sandbox
from capsa.sandbox.handle import Sandbox

__all__ = ["Sandbox", "SandboxBuilder", "SandboxConfig", "sandbox"]
