"""The builder options a raw VM and a sandbox share, written once.

:class:`capsa.VMBuilder` and :class:`capsa.SandboxBuilder` are immutable: each method returns a new
builder made by the class's ``_with(**changes)`` (a copy of its configuration with those fields
changed). The options whose rule and meaning are the same for both (vCPUs, memory, accelerator,
name) live here; those that differ (a sandbox's ``share`` mounts and checks volumes, a raw VM
keeps its lifetime beside its configuration, the ``network`` docs) stay with each builder.
"""

from __future__ import annotations

from typing import Any, Self

from capsa.errors import ConfigError
from capsa.vm.config import validate_cpus, validate_memory_mb

__all__ = ["ACCELERATORS", "CommonOptions"]

ACCELERATORS = ("auto", "kvm", "tcg")


class CommonOptions:
    """Base of the two builders (see the module's docstring)."""

    def _with(self, **changes: Any) -> Self:
        raise NotImplementedError

    def cpus(self, count: int) -> Self:
        """The number of virtual CPUs (default 1)."""
        return self._with(cpus=validate_cpus(count))

    def memory_mb(self, megabytes: int) -> Self:
        """Guest memory in MiB (default 512)."""
        return self._with(memory_mb=validate_memory_mb(megabytes))

    def accelerator(self, name: str) -> Self:
        """``auto`` (default: KVM when it works, else TCG), ``kvm`` or ``tcg``."""
        if name not in ACCELERATORS:
            raise ConfigError(f"accelerator must be one of {ACCELERATORS}, got {name!r}")
        return self._with(accelerator=name)

    def name(self, name: str) -> Self:
        """The VM's name (QEMU's ``-name``: it shows in ``ps`` and QEMU's own messages)."""
        return self._with(name=name)
