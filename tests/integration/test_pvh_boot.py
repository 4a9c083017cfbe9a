"""A user's bzImage with a PVH entry boots through it, and the log says so (issue 27)."""

from __future__ import annotations

import logging

import pytest

import capsa
from capsa.image.kernel import built_kernel

pytestmark = [pytest.mark.vm, pytest.mark.asyncio]


@pytest.mark.timeout(180)
async def test_a_bzimage_boots_through_its_pvh_entry(caplog: pytest.LogCaptureFixture) -> None:
    built = built_kernel()
    if built is None:
        pytest.skip("capsa's kernel is not built (its bzImage is the PVH kernel this boots)")
    caplog.set_level(logging.INFO, logger="capsa.vm.builder")
    async with capsa.vm(capsa.LinuxDirectBoot(built.bzimage)).memory_mb(128) as vm:
        assert vm.config.boot.kernel != built.bzimage  # type: ignore[union-attr]
        assert vm.config.boot.kernel.read_bytes()[:4] == b"\x7fELF"  # type: ignore[union-attr]
        # No root: the kernel runs to its VFS panic (so it booted), and panic=-1 ends the VM.
        with pytest.raises(capsa.VMExited) as info:
            await vm.console.wait_for("this never appears", timeout=120)
    assert "Linux version" in info.value.console_tail or "VFS" in info.value.console_tail
    assert any("through its PVH entry" in r.getMessage() for r in caplog.records)
