"""capsa's kernel config fragment and the check that every option survives olddefconfig."""

from __future__ import annotations

from pathlib import Path

import pytest

from capsa.agent.guest import main as guest_main
from capsa.errors import ImageError
from capsa.image.kernel import CONFIG_FRAGMENT
from capsa.image.kernel.build import check_config, parse_config
from capsa.image.sandbox import INIT_ERROR_MARKER


def test_parse_config_reads_values_and_unset_options() -> None:
    text = 'CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=64\n# a comment\nCONFIG_D="x y"\n'
    assert parse_config(text) == {
        "CONFIG_A": "y",
        "CONFIG_B": "n",
        "CONFIG_C": "64",
        "CONFIG_D": '"x y"',
    }


def test_fragment_builds_in_every_driver_a_sandbox_uses() -> None:
    options = parse_config(CONFIG_FRAGMENT.read_text())
    for needed in (
        "VIRTIO_MMIO", "VIRTIO_PCI", "VIRTIO_BLK", "VIRTIO_CONSOLE", "VIRTIO_NET", "HW_RANDOM_VIRTIO",
        "SQUASHFS", "EROFS_FS", "OVERLAY_FS", "EXT4_FS", "VIRTIO_FS", "9P_FS", "NET_9P_VIRTIO",
        "PVH", "KVM_GUEST", "ACPI", "PCI", "KERNEL_LZ4", "BINFMT_SCRIPT", "DEVTMPFS", "EPOLL",
    ):  # fmt: skip
        assert options.get(f"CONFIG_{needed}") == "y", needed
    assert options["CONFIG_MODULES"] == "n"  # everything built in: no insmod at boot


def test_check_config_names_options_that_were_dropped(tmp_path: Path) -> None:
    final = parse_config(CONFIG_FRAGMENT.read_text())
    final["CONFIG_VIRTIO_FS"] = "n"  # e.g. a dependency was missing
    final["CONFIG_SERIO_I8042"] = "y"  # e.g. something selected it back
    path = tmp_path / ".config"
    path.write_text("".join(f"{k}={v}\n" for k, v in final.items()))
    with pytest.raises(ImageError) as info:
        check_config(path)
    assert "CONFIG_VIRTIO_FS=y (got n)" in str(info.value)
    assert "CONFIG_SERIO_I8042=n (got y)" in str(info.value)


def test_check_config_accepts_a_matching_config(tmp_path: Path) -> None:
    final = parse_config(CONFIG_FRAGMENT.read_text())
    path = tmp_path / ".config"
    lines = [f"# {k} is not set" if v == "n" else f"{k}={v}" for k, v in final.items()]
    path.write_text("\n".join([*lines, "CONFIG_EXTRA=y"]) + "\n")
    check_config(path)


def test_guest_agent_uses_the_hosts_error_marker() -> None:
    assert guest_main.INIT_ERROR_MARKER == INIT_ERROR_MARKER


def _fake_built_kernel(directory: Path) -> None:
    import hashlib
    import json

    directory.mkdir(parents=True)
    sums = {}
    for name in ("bzImage", "vmlinux", "config"):
        data = f"fake {name}".encode()
        (directory / name).write_bytes(data)
        sums[name] = hashlib.sha256(data).hexdigest()
    manifest = {"source_version": "6.1.1-1", "release": "6.1.1", "sha256": sums}
    (directory / "manifest.json").write_text(json.dumps(manifest))


def test_a_corrupt_cached_kernel_is_not_used(tmp_path: Path) -> None:
    from capsa.image.kernel.build import _load

    directory = tmp_path / "capsa-6.1.1-1-abc"
    _fake_built_kernel(directory)
    loaded = _load(directory)
    assert loaded is not None and loaded.release == "6.1.1"
    (directory / "vmlinux").write_bytes(b"fake vmlinuX")  # same size, one byte flipped
    assert _load(directory) is None  # so built_kernel() reports it missing and it gets rebuilt


def test_a_failed_build_names_its_log_and_the_fallback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from capsa.image.kernel import build as kernel_build

    bogus = tmp_path / "linux-source-6.1.tar.xz"
    bogus.write_bytes(b"not a tarball")
    monkeypatch.setenv("CAPSA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(
        kernel_build, "find_kernel_source", lambda: kernel_build.KernelSource(bogus, "0-test")
    )
    monkeypatch.setattr(kernel_build, "missing_build_tools", list)
    with pytest.raises(ImageError) as info:
        kernel_build.build_kernel()
    message = str(info.value)
    assert "unpacking the source" in message and ".build.log" in message
    assert "fall back to the stock Debian kernel" in message
    logs = list((tmp_path / "cache" / "kernels").glob("*.build.log"))
    assert len(logs) == 1 and "tar" in logs[0].read_text()
    assert not list((tmp_path / "cache" / "kernels").glob(".build-*"))  # the work tree is gone


def test_a_long_build_step_reports_progress(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel compile runs for minutes: setup must say it is alive, not print nothing."""
    from capsa.image.kernel import build

    monkeypatch.setattr(build, "REPORT_EVERY", 0.3)
    log_path = tmp_path / "build.log"
    said: list[str] = []
    script = "echo '  CC a.o'; echo '  CC b.o'; sleep 1.2; echo '  AS c.o'"
    with log_path.open("w") as log_file:
        runner = build._StepRunner(tmp_path, log_file, log_path, said.append)
        runner("compiling", ["sh", "-c", script])
    assert said[0] == "kernel: compiling"
    reports = [line for line in said[1:] if "files compiled" in line]
    assert len(reports) >= 2, said
    assert reports[-1].endswith("2 files compiled") or reports[-1].endswith("3 files compiled")


def test_a_failing_build_step_names_its_log(tmp_path: Path) -> None:
    from capsa.errors import ImageError
    from capsa.image.kernel import build

    log_path = tmp_path / "build.log"
    with log_path.open("w") as log_file:
        runner = build._StepRunner(tmp_path, log_file, log_path, None)
        with pytest.raises(ImageError, match="exit 3"):
            runner("configuring", ["sh", "-c", "exit 3"])
