"""Shared directories on real guests: virtio-fs and 9p, read-only enforced on the host, no escape,
many shares with awkward names, large files, raw-VM manual mounts and bad input."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
from pathlib import Path

import pytest

import capsa
from capsa import AccessMode
from capsa.image.busybox import PROMPT, READY_MARKER, busybox_guest
from capsa.image.kernels import default_kernel
from tests.conftest import SandboxFactory, VMFactory

pytestmark = [pytest.mark.vm]

MECHANISMS = ["virtiofs", "9p"]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """tmp/secret.txt next to tmp/src (read-only share) and tmp/out (read-write share)."""
    (tmp_path / "secret.txt").write_text("host secret\n")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "code.py").write_text("print('from the host')\n")
    (tmp_path / "src" / "to-secret").symlink_to(tmp_path / "secret.txt")  # absolute, made on the host
    (tmp_path / "out").mkdir()
    return tmp_path


async def sh(vm: capsa.Sandbox, script: str) -> capsa.ExecResult:
    return await vm.agent.exec("sh").args(["-c", script]).timeout(60).run()


@pytest.mark.asyncio
@pytest.mark.parametrize("mechanism", MECHANISMS)
async def test_read_only_is_enforced_on_the_host(
    mechanism: str, tree: Path, sandbox_factory: SandboxFactory
) -> None:
    vm = await sandbox_factory(
        capsa.sandbox().share(tree / "src", "/mnt/src", AccessMode.READ_ONLY, mechanism=mechanism)
    )
    assert [(s.guest_path, s.mechanism) for s in vm.shares] == [("/mnt/src", mechanism)]
    assert await vm.agent.read_file("/mnt/src/code.py") == b"print('from the host')\n"
    assert (await vm.agent.exec("python3").arg("/mnt/src/code.py").run()).stdout == "from the host\n"
    with pytest.raises(capsa.GuestPermissionError):
        await vm.agent.write_file("/mnt/src/code.py", b"tampered")
    attack = await sh(
        vm,
        "mount -o remount,rw /mnt/src; echo remount=$?; "
        "echo tampered > /mnt/src/code.py; echo write=$?; touch /mnt/src/new; echo create=$?; "
        "rm -f /mnt/src/code.py; echo rm=$?; chmod 777 /mnt/src/code.py; echo chmod=$?",
    )
    assert "write=0" not in attack.stdout and "create=0" not in attack.stdout, attack.stdout
    assert "rm=0" not in attack.stdout and "chmod=0" not in attack.stdout, attack.stdout
    assert (tree / "src" / "code.py").read_text() == "print('from the host')\n"
    assert sorted(p.name for p in (tree / "src").iterdir()) == ["code.py", "to-secret"]


@pytest.mark.asyncio
@pytest.mark.parametrize("mechanism", MECHANISMS)
async def test_read_write_round_trip_and_ownership(
    mechanism: str, tree: Path, sandbox_factory: SandboxFactory
) -> None:
    out = tree / "out"
    vm = await sandbox_factory(
        capsa.sandbox().share(out, "/mnt/out", AccessMode.READ_WRITE, mechanism=mechanism)
    )
    await vm.agent.write_file("/mnt/out/from-guest.txt", b"guest data")
    await sh(vm, "mkdir -p /mnt/out/dir/sub && echo nested > /mnt/out/dir/sub/f")
    assert (out / "from-guest.txt").read_bytes() == b"guest data"
    assert (out / "dir" / "sub" / "f").read_text() == "nested\n"
    assert (out / "from-guest.txt").stat().st_uid == os.getuid()  # guest root -> the capsa user
    (out / "from-host.txt").write_text("host data")
    assert await vm.agent.read_file("/mnt/out/from-host.txt") == b"host data"
    await vm.agent.remove("/mnt/out/dir", recursive=True)
    assert not (out / "dir").exists()


@pytest.mark.asyncio
@pytest.mark.parametrize("mechanism", MECHANISMS)
async def test_no_path_escapes_the_share(
    mechanism: str, tree: Path, sandbox_factory: SandboxFactory
) -> None:
    vm = await sandbox_factory(
        capsa.sandbox()
        .share(tree / "src", "/mnt/src", AccessMode.READ_ONLY, mechanism=mechanism)
        .share(tree / "out", "/mnt/out", AccessMode.READ_WRITE, mechanism=mechanism)
    )
    secret = str(tree / "secret.txt")
    probe = await sh(
        vm,
        f"cat /mnt/src/../secret.txt /mnt/out/../secret.txt /mnt/src/to-secret {secret} 2>/dev/null; "
        f"ln -s {secret} /mnt/out/abs; ln -s ../secret.txt /mnt/out/rel; ln -s / /mnt/out/root; "
        f"cat /mnt/out/abs /mnt/out/rel /mnt/out/root{secret} 2>/dev/null; "
        "cd /mnt/out && cat ../../../../secret.txt 2>/dev/null; echo done",
    )
    assert "host secret" not in probe.stdout
    assert probe.stdout.endswith("done\n")
    # The guest-made links are plain links inside the share; the secret is untouched. A writable 9p
    # share (security_model=mapped-xattr) stores them as regular files holding the target, so no
    # host program that follows links in the share can be redirected by the guest.
    assert (tree / "secret.txt").read_text() == "host secret\n"
    if mechanism == "9p":
        assert not (tree / "out" / "abs").is_symlink()
        assert (tree / "out" / "abs").read_text() == secret
    else:
        assert os.readlink(tree / "out" / "abs") == secret


@pytest.mark.asyncio
async def test_many_shares_with_spaces_unicode_and_large_files(
    tmp_path: Path, sandbox_factory: SandboxFactory
) -> None:
    builder = capsa.sandbox()
    for i in range(8):
        host = tmp_path / f"share {i} ü→"
        host.mkdir()
        (host / f"file {i}.txt").write_text(f"content {i}\n")
        builder = builder.share(host, f"/mnt/shäre {i}", AccessMode.READ_WRITE)
    big = os.urandom(48 << 20)
    (tmp_path / "share 0 ü→" / "big.bin").write_bytes(big)
    vm = await sandbox_factory(builder)
    assert len(vm.shares) == 8
    for i in range(8):
        assert await vm.agent.read_file(f"/mnt/shäre {i}/file {i}.txt") == f"content {i}\n".encode()
    digest = await vm.agent.exec("sha256sum").arg("/mnt/shäre 0/big.bin").run()
    assert digest.stdout.split()[0] == hashlib.sha256(big).hexdigest()
    copied = await vm.agent.exec("cp").args(["/mnt/shäre 0/big.bin", "/mnt/shäre 7/copy.bin"]).run()
    assert copied.exit_code == 0, copied.stderr
    assert (tmp_path / "share 7 ü→" / "copy.bin").read_bytes() == big


@pytest.mark.asyncio
async def test_raw_vm_mounts_its_shares_itself(tree: Path, vm_factory: VMFactory) -> None:
    guest = busybox_guest(kernel=default_kernel())
    (tree / "out" / "data.txt").write_text("raw vm data\n")
    builder = capsa.vm(capsa.LinuxDirectBoot(guest.kernel, guest.initrd)).share(
        tree / "out", "/data", AccessMode.READ_WRITE
    )
    vm = await vm_factory(builder)
    await vm.console.wait_for(READY_MARKER, timeout=60)
    await vm.console.wait_for(PROMPT, timeout=30)
    [(tag, host_path, guest_path, mode)] = vm.shares
    assert (host_path, guest_path, mode) == (tree / "out", "/data", AccessMode.READ_WRITE)
    await vm.console.exec_line(f"mkdir -p {guest_path} && mount -t virtiofs {tag} {guest_path}")
    assert await vm.console.exec_line("cat /data/data.txt") == "raw vm data\n"
    await vm.console.exec_line("echo back > /data/back.txt")
    assert (tree / "out" / "back.txt").read_text() == "back\n"


def test_bad_share_arguments_are_config_errors(tree: Path) -> None:
    builder = capsa.sandbox()
    with pytest.raises(capsa.ConfigError, match="not found"):
        builder.share(tree / "missing", "/mnt/x")
    with pytest.raises(capsa.ConfigError, match="not a directory"):
        builder.share(tree / "secret.txt", "/mnt/x")
    with pytest.raises(capsa.ConfigError, match="absolute"):
        builder.share(tree / "src", "mnt/x")
    with pytest.raises(capsa.ConfigError, match=r"'\.' or '\.\.'"):
        builder.share(tree / "src", "/mnt/../etc")
    with pytest.raises(capsa.ConfigError, match="mechanism"):
        builder.share(tree / "src", "/mnt/x", mechanism="nfs")
    with pytest.raises(capsa.ConfigError, match="two shares use the guest path /mnt/x"):
        builder.share(tree / "src", "/mnt/x").share(tree / "out", "/mnt/x/")
    with pytest.raises(capsa.ConfigError, match="mode"):
        builder.share(tree / "src", "/mnt/x", "ro")


@pytest.mark.asyncio
async def test_virtiofsd_dying_stops_the_vm_and_says_why(
    tree: Path, sandbox_factory: SandboxFactory
) -> None:
    builder = capsa.sandbox().share(
        tree / "out", "/mnt/out", AccessMode.READ_WRITE, mechanism="virtiofs"
    )
    vm = await sandbox_factory(builder)
    daemons = vm._daemons
    assert len(daemons) == 1
    os.kill(daemons[0].pid, signal.SIGKILL)
    with pytest.raises(capsa.ShareError, match=r"virtiofsd serving .* died"):
        await asyncio.wait_for(vm.agent.exec("sleep").arg("30").run(), 30)
    await asyncio.wait_for(vm.wait(), 10)
    assert vm.status is capsa.RunState.FAILED
