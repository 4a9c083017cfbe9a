"""``capsa doctor --max-sandboxes N`` and admission control: the host limits N sandboxes need."""

from __future__ import annotations

import resource
from collections.abc import Iterator
from pathlib import Path

import pytest

from capsa.cli.doctor import host_limits, memory_merging
from capsa.errors import CapacityError, ConfigError
from capsa.vm import admission
from capsa.vm.host_limits import limits_for


@pytest.fixture
def low_nofile() -> Iterator[int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = admission.open_fds() + 100
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
    yield low
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_doctor_warns_when_ulimit_n_is_too_low_for_n_sandboxes(low_nofile: int) -> None:
    checks = {c.name: c for c in host_limits(500)}
    files = checks["limit: open files (ulimit -n)"]
    assert not files.ok and f"allows {low_nofile}" in files.detail and "ulimit -n" in files.fix
    assert checks["limit: open files (ulimit -n)"].detail.startswith("500 sandboxes need")
    assert {c.name for c in host_limits(1)} == set(checks)  # the same rows for any N
    assert all(limit.needed > 0 for limit in limits_for(1))
    names = " ".join(checks)
    for limit in ("kernel.pid_max", "kernel.threads-max", "vm.max_map_count", "ulimit -u", "memory"):
        assert limit in names


def test_admission_refuses_a_vm_the_fd_limit_cannot_hold(low_nofile: int) -> None:
    with pytest.raises(CapacityError) as caught:
        admission.check_fds(starting=20)  # 20 others starting: 160 more fds than the 100 left
    assert caught.value.resource == "open files" and caught.value.available == low_nofile
    admission.check_fds()  # one alone fits: 100 left >= 8 + 64 spare


def test_admission_memory_counts_the_vms_starting_and_is_configurable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    available = admission.mem_available_mb()
    # Room for two VMs of 400 MiB; wide margins, as other processes move MemAvailable meanwhile.
    monkeypatch.setenv("CAPSA_VM_HOST_MB", "400")
    monkeypatch.setenv("CAPSA_MIN_FREE_MB", str(available - 1000))
    admission.check_memory(starting=0)
    with pytest.raises(CapacityError) as caught:
        admission.check_memory(starting=4)
    assert caught.value.resource == "memory" and caught.value.unit == "MiB"
    monkeypatch.setenv("CAPSA_MIN_FREE_MB", "0")
    admission.check_memory(starting=10**6)  # 0 turns the check off
    monkeypatch.setenv("CAPSA_MIN_FREE_MB", "lots")
    with pytest.raises(ConfigError):
        admission.check_memory()


def test_doctor_suggests_ksm_when_off_and_never_fails_on_it(tmp_path: Path) -> None:
    for name, value in (("run", "0"), ("pages_to_scan", "100"), ("sleep_millisecs", "20")):
        (tmp_path / name).write_text(value + "\n")
    off = memory_merging(tmp_path)
    assert off.ok and off.detail == "off" and f"echo 1 > {tmp_path}/run" in off.fix
    (tmp_path / "run").write_text("1\n")
    on = memory_merging(tmp_path)
    assert on.ok and on.detail == "on: 100 pages every 20 ms" and not on.fix
    missing = memory_merging(tmp_path / "absent")
    assert missing.ok and "not available" in missing.detail
